#!/usr/bin/env bash
# kill9-agentd with agentd told to use no cgroup (--no-cgroup), on any host: with
# the process-tree fallback the agent and its own process group must still be gone
# within 5 s of agentd's SIGKILL (the channel's EOF, the parent-death signal);
# detached descendants are its documented limit.
KT_NAME=kill9-agentd-fallback KT_CONTAINMENT=tree KT_AGENTD_EXTRA=--no-cgroup \
    exec "$(dirname "$0")/kill9-agentd.sh"
