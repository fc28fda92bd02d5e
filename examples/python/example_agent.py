#!/usr/bin/env python3
"""An example agentd agent in Python (stdlib only), built on agentd_agent.py.

It does a task in numbered steps, as a real agent would run tool calls:

    agentd --agent 'python3 examples/python/example_agent.py {text}'
    agentctl send --session me 'steps:20 delay:500ms write a haiku'

- progress: "step K/N: TASK TEXT" for every step;
- steering: a steered message is acknowledged, reported as "steered: TEXT" and
  kept as a note that the result lists (agentd's `steer` queue mode);
- checkpoint: after each step it saves {"step": K, "notes": [...]} and reports
  "checkpoint saved: step K" (when agentd speaks protocol 2);
- resume: a resumed attempt starts after the step of its checkpoint and reports
  "resumed from TASK_ID at step K";
- cancel: on a cooperative cancel (`/stop`) it stops between steps and reports
  the result `cancelled` ("cancelled after step K of N");
- result: "done: N steps; notes: ...".

Words of the task text: `steps:N` (default 10) and `delay:MS` or `delay:Ns`
(default 200 ms) set the work; the rest is the task's description.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import agentd_agent  # noqa: E402


def parse(text):
    steps, delay, words = 10, 0.2, []
    for word in text.split():
        if word.startswith("steps:"):
            steps = int(word[len("steps:"):])
        elif word.startswith("delay:"):
            value = word[len("delay:"):]
            if value.endswith("ms"):
                delay = int(value[:-2]) / 1000.0
            elif value.endswith("s"):
                delay = float(value[:-1])
            else:
                delay = int(value) / 1000.0
        else:
            words.append(word)
    return steps, delay, " ".join(words) or "(no description)"


def main():
    try:
        agent = agentd_agent.Agent.connect(
            "example_agent.py 1.0", steer=True, collected_prompts=True, checkpoints=True
        )
    except agentd_agent.HandshakeError as e:
        print("example_agent.py: %s" % e, file=sys.stderr)
        return 2
    # agentd passes the text in argv ({text}) and in the Start message.
    task_text = " ".join(sys.argv[1:]) or agent.task.text
    try:
        steps, delay, description = parse(task_text)
    except ValueError as e:
        agent.result(agentd_agent.FAILED, "bad task words: %s" % e)
        return 1

    done, notes = 0, []
    if agent.resume is not None:
        if agent.resume.checkpoint:
            state = json.loads(agent.resume.checkpoint)
            done, notes = int(state["step"]), list(state.get("notes", []))
        agent.progress("resumed from %s at step %d" % (agent.resume.previous_task_id, done))

    for step in range(done + 1, steps + 1):
        # One step of "work": `delay` long, taking steers as they come.
        deadline = time.monotonic() + delay
        while not agent.cancelled.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or agent.wait(remaining):
                break
            for text in agent.take_steers():
                agent.steer_ack(True)
                notes.append(text)
                agent.progress("steered: %s" % text)
        if agent.cancelled.is_set():
            break
        agent.progress("step %d/%d: %s" % (step, steps, description))
        done = step
        if agent.checkpoint(json.dumps({"step": done, "notes": notes})):
            agent.progress("checkpoint saved: step %d" % done)

    # Steers that came too late to act on are refused: agentd runs them as follow-ups.
    for _ in agent.take_steers():
        agent.steer_ack(False)
    if agent.cancelled.is_set():
        agent.result(agentd_agent.CANCELLED, "cancelled after step %d of %d" % (done, steps))
        return 0
    agent.result(agentd_agent.SUCCEEDED, "done: %d steps; notes: %s" % (steps, "; ".join(notes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
