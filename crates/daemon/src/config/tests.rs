use super::*;

#[test]
fn limits_are_durations_or_off() {
    assert_eq!(
        parse_limit("1500ms").unwrap(),
        Limit(Some(Duration::from_millis(1500)))
    );
    assert_eq!(parse_limit(" off ").unwrap(), Limit(None));
    let e = parse_limit("soon").unwrap_err().to_string();
    assert!(e.contains("\"soon\"") && e.contains("off"), "{e}");
}

/// A duration is later added to the clock (`Instant + frame-timeout` panicked on
/// overflow at every agent frame) and written as i64 milliseconds: past 100 years
/// it is refused, with the bound in the message.
#[test]
fn durations_past_100_years_are_refused() {
    assert_eq!(
        parse_duration("100y").unwrap(),
        Duration::from_secs(3_155_760_000)
    );
    for text in ["101y", "10000000000000000000s", "500000000y"] {
        let e = parse_duration(text).unwrap_err().to_string();
        assert!(e.contains("at most 100 years"), "{text}: {e}");
        let e = parse_limit(text).unwrap_err().to_string();
        assert!(e.contains("at most 100 years"), "{text}: {e}");
    }
    assert_eq!(
        parse_limit("100y").unwrap(),
        Limit(Some(Duration::from_secs(3_155_760_000)))
    );
}

#[test]
fn words() {
    let w = |s: &str| split_words(s).unwrap();
    assert_eq!(
        w("agent-exec -- sh -c {text}"),
        ["agent-exec", "--", "sh", "-c", "{text}"]
    );
    assert_eq!(
        w(r#"a 'b c' "d \"e\"" f\ g"#),
        ["a", "b c", "d \"e\"", "f g"]
    );
    assert_eq!(w("  "), Vec::<String>::new());
    assert_eq!(w("''"), [""]);
    assert!(split_words("'open").is_err());
    assert!(split_words("\"open").is_err());
}

#[test]
fn agent_exec_running_a_command_wants_no_collected_prompts() {
    let wants = |line: &str| agent_wants_collected_prompts(&split_words(line).unwrap());
    assert!(!wants("agent-exec -- sh -c {text}"));
    assert!(!wants("/opt/bin/agent-exec --no-steer -- sh -c {text}"));
    assert!(wants("agent-exec --collect -- my-llm-cli {text}"));
    assert!(!wants("agent-exec -- my-tool --collect {text}"));
    assert!(wants("my-llm-agent --model x {text}"));
    assert!(wants("agentd-test-agent {text}"));
}

#[test]
fn text_is_substituted_in_every_word() {
    let template = vec![
        "/bin/echo".to_string(),
        "x{text}y".to_string(),
        "{text}".to_string(),
    ];
    let (program, args) = agent_argv(&template, "hi there");
    assert_eq!(program, "/bin/echo");
    assert_eq!(args, ["xhi therey", "hi there"]);
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
    assert!(parse_duration("soon").is_err());
}

const EXAMPLE: &str = include_str!("../../../../examples/config.toml");

/// The example with every `# key = value` and `# [table]` line uncommented.
fn example_uncommented() -> String {
    EXAMPLE
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(key, _)| {
                    key.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                }) =>
            {
                rest
            }
            // A table header, e.g. `# [matrix]` (kept last in the example).
            Some(rest) if rest.starts_with('[') && rest.ends_with(']') => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn example_config_loads_as_is_and_changes_nothing() {
    let file = FileConfig::parse(EXAMPLE).unwrap();
    let json = serde_json::to_value(&file).unwrap();
    let set: Vec<_> = json
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| !v.is_null())
        .collect();
    assert!(set.is_empty(), "the example must set nothing: {set:?}");
}

#[test]
fn example_config_lists_every_key_with_its_default() {
    let text = example_uncommented();
    let file = FileConfig::parse(&text).unwrap();
    let json = serde_json::to_value(&file).unwrap();
    let missing: Vec<_> = json
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.is_null())
        .map(|(k, _)| k.clone())
        .collect();
    assert!(missing.is_empty(), "examples/config.toml lacks {missing:?}");
    assert!(FileConfig::keys().len() >= 17, "{:?}", FileConfig::keys());

    // The values shown are the defaults agentd uses.
    let queue = agentd_core::QueueSettings::default();
    let d = |v: &Option<String>| parse_duration(v.as_deref().unwrap()).unwrap();
    assert_eq!(
        parse_mode(file.queue_mode.as_deref().unwrap()).unwrap(),
        queue.mode
    );
    assert_eq!(d(&file.debounce), queue.debounce);
    assert_eq!(file.cap, Some(queue.cap));
    assert_eq!(
        parse_drop(file.drop.as_deref().unwrap()).unwrap(),
        queue.drop
    );
    assert_eq!(file.max_connections, Some(DEFAULT_MAX_CONNECTIONS));
    assert_eq!(d(&file.request_timeout), DEFAULT_REQUEST_TIMEOUT);
    assert_eq!(
        parse_agent_command(file.agent.as_deref().unwrap()).unwrap(),
        default_agent_command()
    );
    assert_eq!(
        LogFormat::parse(file.log_format.as_deref().unwrap()).unwrap(),
        LogFormat::default()
    );
    assert_eq!(file.log_cap, Some(agentd_store::output::DEFAULT_LOG_CAP));
    let agents = AgentLimits::default();
    assert_eq!(file.no_cgroup, Some(agents.no_cgroup));
    assert_eq!(d(&file.heartbeat), agents.heartbeat);
    assert_eq!(d(&file.frame_timeout), agents.frame_timeout);
    let limit = |v: &Option<String>| parse_limit(v.as_deref().unwrap()).unwrap().0;
    assert_eq!(limit(&file.hung_after), agents.hung_after);
    assert_eq!(limit(&file.task_timeout), agents.task_timeout);
}

#[test]
fn config_errors_name_the_line() {
    let err = |text: &str| format!("{:#}", FileConfig::parse(text).unwrap_err());
    let e = err("cap = 3\nmax-concurent = 3\n");
    assert!(e.starts_with("line 2: "), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
    let e = err("cap = 3\n\ncancel-grace = \"soon\"\n");
    assert!(
        e.starts_with("line 3: cancel-grace: invalid duration"),
        "{e}"
    );
    let e = err("cap = 3\nqueue-mode = 'sometimes'\n");
    assert!(
        e.starts_with("line 2: queue-mode: unknown queue mode"),
        "{e}"
    );
    let e = err("cap = [\n");
    assert!(e.starts_with("line "), "{e}");
    let e = err("max-concurrent = 0");
    assert!(
        e.starts_with("line 1: max-concurrent: must be at least 1"),
        "{e}"
    );
    // Every duration is checked where it is read, with its line.
    let e = err("cap = 3\nretention-age = \"soon\"\n");
    assert!(
        e.starts_with("line 2: retention-age: invalid duration"),
        "{e}"
    );
    // Zero where agentd needs more: named as the file's key, not as a flag.
    for key in ["heartbeat", "frame-timeout", "request-timeout"] {
        let e = err(&format!("cap = 3\n{key} = \"0s\"\n"));
        assert_eq!(e, format!("line 2: {key}: must be more than 0"));
    }
    let e = err("task-timeout = \"0ms\"");
    assert_eq!(e, "line 1: task-timeout: must be more than 0 (or off)");
    let e = err("log-format = 'xml'");
    assert!(
        e.starts_with("line 1: log-format: unknown log format"),
        "{e}"
    );
}

#[test]
fn default_config_path_follows_xdg() {
    let p = |x: Option<&str>, h: Option<&str>| {
        config_path_from(x.map(PathBuf::from), h.map(PathBuf::from))
    };
    assert_eq!(
        p(Some("/x"), Some("/home/me")),
        Some(PathBuf::from("/x/agentd/config.toml"))
    );
    assert_eq!(
        p(Some("relative"), Some("/home/me")),
        Some(PathBuf::from("/home/me/.config/agentd/config.toml"))
    );
    assert_eq!(p(None, None), None);
}

#[test]
fn file_config_rejects_unknown_keys() {
    assert!(toml::from_str::<FileConfig>("max-concurrent = 3\nagent = 'x {text}'").is_ok());
    assert!(toml::from_str::<FileConfig>("max_concurent = 3").is_err());
}

#[test]
fn the_agent_program_is_checked_as_a_spawn_would_find_it() {
    let words = |line: &str| parse_agent_command(line).unwrap();
    // On agentd's PATH (a wrapper: what it runs in turn is not checked).
    assert_eq!(
        check_agent_program(&words("sh -c 'nosuchprog {text}'")),
        Ok(())
    );
    // Known only when a task runs.
    assert_eq!(check_agent_program(&words("{text} --flag")), Ok(()));
    let err = check_agent_program(&words("agentd-no-such-program {text}")).unwrap_err();
    assert!(
        err.starts_with("the agent program \"agentd-no-such-program\" is not found"),
        "{err}"
    );
    assert!(err.contains("PATH ("), "{err}");
    assert_eq!(
        check_agent_program(&words("/nonexistent/agent")),
        Err("the agent program \"/nonexistent/agent\" does not exist".into())
    );
    assert_eq!(
        check_agent_program(&words("/ {text}")),
        Err("the agent program \"/\" is a directory".into())
    );
}
