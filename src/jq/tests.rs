use super::*;

fn run(kind: Kind, program: &str, input: &str, vars: &[&str]) -> Output {
    let compiled = compile(kind, program).unwrap_or_else(|e| panic!("{program}: {e}"));
    eval(&compiled, input.as_bytes(), vars)
}

fn filter(program: &str, input: &str) -> Output {
    run(Kind::Filter, program, input, &["buttercms", "page.published"])
}

fn value(out: Output) -> String {
    match out {
        Output::Value(v) => String::from_utf8(v).unwrap(),
        other => panic!("expected a value, got {other:?}"),
    }
}

fn failure(out: Output) -> Failure {
    match out {
        Output::Failed(f) => f,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn syntax_errors_name_what_was_expected_and_where() {
    let e = Program::compile(Kind::Filter, ".data | if . then 1").unwrap_err();
    assert!(e.contains("expected else or end"), "{e}");
    assert!(e.contains("at the end of the program"), "{e}");
    let e = Program::compile(Kind::Filter, ".a == 1 and\n  (.b ==)").unwrap_err();
    assert!(e.contains("line 2, column"), "{e}");
    let e = Program::compile(Kind::Filter, "").unwrap_err();
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn undefined_names_are_compile_errors() {
    let e = Program::compile(Kind::Filter, ".a | nosuchfunction").unwrap_err();
    assert!(e.contains("undefined filter nosuchfunction") && e.contains("line 1, column 6"), "{e}");
    // Filters see $source and $event; only transforms see $id.
    let e = Program::compile(Kind::Filter, "$id").unwrap_err();
    assert!(e.contains("undefined variable"), "{e}");
    assert!(Program::compile(Kind::Transform, "{id: $id, s: $source, e: $event}").is_ok());
    assert!(Program::compile(Kind::Filter, "$ENV.HOME").is_err(), "$ENV is not defined");
}

#[test]
fn truthiness_is_jq_s() {
    for (program, truthy) in [
        ("true", true),
        ("false", false),
        ("null", false),
        ("0", true),
        ("\"\"", true),
        ("[]", true),
        ("{}", true),
        ("empty", false),
        ("false, true", false), // the first output decides
        (".data.page_type == \"landing\"", true),
        (".data.missing", false),
    ] {
        let out = filter(program, r#"{"data":{"page_type":"landing"}}"#);
        assert_eq!(out.truthy(), Some(truthy), "{program}: {out:?}");
    }
    assert_eq!(filter("error(\"x\")", "{}").truthy(), None);
}

#[test]
fn variables_hold_source_event_and_id() {
    let out = run(Kind::Transform, "[$source, $event, $id]", "{}", &["cometcms", "content.published", "evt_1"]);
    assert_eq!(value(out), r#"["cometcms","content.published","evt_1"]"#);
    assert_eq!(filter("$event | startswith(\"page.\")", "{}").truthy(), Some(true));
}

#[test]
fn the_first_output_is_compact_json() {
    let out = run(
        Kind::Transform,
        r#"{text: "\($event): \(.data.name)"}, 2"#,
        r#"{"data":{"name":"Home"}}"#,
        &["s", "page.published", "evt_1"],
    );
    assert_eq!(value(out), r#"{"text":"page.published: Home"}"#);
    assert_eq!(run(Kind::Transform, "empty", "{}", &["s", "e", "i"]), Output::Empty);
    // Big numbers and unicode come through unchanged.
    assert_eq!(value(filter(".n", r#"{"n":12345678901234567890}"#)), "12345678901234567890");
    assert_eq!(value(filter(".s", r#"{"s":"é ✓ \u0000"}"#)), r#""é ✓ \u0000""#);
}

#[test]
fn runtime_errors_are_failures_not_panics() {
    let f = failure(filter(".a + 1", r#"{"a":"text"}"#));
    assert_eq!(f.kind, FailureKind::Runtime);
    assert!(f.message.contains("cannot"), "{}", f.message);
    let f = failure(filter("error(\"custom\")", "{}"));
    assert!(f.message.contains("custom"), "{}", f.message);
    let f = failure(filter(".", "not json"));
    assert_eq!(f.kind, FailureKind::Input);
    let f = failure(filter("nan", "{}"));
    assert_eq!(f.kind, FailureKind::Output);
    // A payload-sized error message is cut short.
    let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(10_000));
    assert!(failure(filter("error(.a)", &big)).message.len() < 400);
}

#[test]
fn halt_ends_the_program_not_the_process() {
    let f = failure(filter("halt", "{}"));
    assert!(f.message.contains("halt"), "{}", f.message);
    let f = failure(filter("\"bye\" | halt_error(3)", "{}"));
    assert!(f.message.contains("exit code 3"), "{}", f.message);
}

#[test]
fn env_and_logging_reveal_nothing() {
    let path = std::env::var("PATH").unwrap_or_default();
    let f = failure(filter("env.PATH", "{}"));
    assert!(path.is_empty() || !f.message.contains(&path), "{}", f.message);
    assert_eq!(value(filter(".a | debug | stderr", r#"{"a":1}"#)), "1");
}

#[test]
fn a_key_no_store_can_index_stands_as_its_digest() {
    assert_eq!(storable_key("page-7".into()), "page-7");
    let nul = storable_key("a\0b".into());
    assert!(nul.starts_with("sha256:") && nul.len() == 7 + 64 && !nul.contains('\0'), "{nul}");
    let long = "x".repeat(MAX_KEY + 1);
    let (a, b) = (storable_key(long.clone()), storable_key(long));
    assert!(a.starts_with("sha256:") && a == b, "equal keys stay equal: {a}");
    assert_ne!(a, storable_key("y".repeat(MAX_KEY + 1)));
    assert_eq!(storable_key("x".repeat(MAX_KEY)).len(), MAX_KEY, "at the limit: as it is");
}

#[test]
fn an_output_past_its_limit_is_a_failure_not_a_body() {
    let f = failure(run(Kind::Transform, r#""x" * 17000000"#, "null", &["s", "e", "id"]));
    assert_eq!(f.kind, FailureKind::Output);
    assert!(f.message.contains("17000002 bytes, over the 16 MiB"), "{}", f.message);
    assert_eq!(value(run(Kind::Transform, r#""x" * 1000 | length"#, "null", &["s", "e", "id"])), "1000");
}
