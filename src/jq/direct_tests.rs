use serde_json::json;

use super::*;
use crate::jq::{compile, eval, Output};

const VARS: &[&str] = &["buttercms", "page.published"];

fn direct(kind: Kind, text: &str) -> Direct {
    Direct::compile(kind, text).unwrap_or_else(|| panic!("{text} is in the subset"))
}

#[test]
fn the_subset_is_paths_literals_comparisons_and_logic() {
    for text in [
        ".",
        ".data.id",
        r#".data."page type""#,
        r#".["data"]["id"]"#,
        ".items[0].id",
        "(.data).id",
        r#".data.page_type == "landing" and .data.locale == null"#,
        ".a != 1 or .b < -2 or .c <= 3 or .d > 4 or .e >= 5",
        ".data.id // .data.slug",
        ".data.draft | not",
        "$event == \"page.published\" and $source != \"x\"",
        "true",
        "false or null",
        r#""a\nb" == .x"#,
        ".a? == 1",
    ] {
        assert!(Direct::compile(Kind::Filter, text).is_some(), "{text}");
    }
    for text in [
        ".[]",
        ".a[1:]",
        ".a[-1]",
        ".a + 1 == 2",
        "1.5 < .a",
        r#""\(.a)" == "x""#,
        "@base64 \"x\" == .a",
        "(.a == 1)?",
        "if .a then true else false end",
        ".a | length > 1",
        "def f: .a; f",
        ".a as $x | $x",
        ".a, .b",
        "$__loc__",
        "$id == \"x\"",
        ".a | test(\"x\")",
    ] {
        assert!(Direct::compile(Kind::Filter, text).is_none(), "{text}");
    }
    assert!(Direct::compile(Kind::Transform, ".a").is_none(), "a transform always runs in the sandbox");
    let deep = format!("{}true{}", "(".repeat(100), ")".repeat(100));
    let deep_and = vec!["true"; 100].join(" and ");
    assert!(Direct::compile(Kind::Filter, &deep).is_some(), "parentheses add no depth");
    assert!(Direct::compile(Kind::Filter, &deep_and).is_none(), "past {MAX_DEPTH} levels: the sandbox");
}

#[test]
fn filters_and_keys_on_a_buttercms_webhook() {
    let page: Value =
        serde_json::from_slice(include_bytes!("../../tests/fixtures/buttercms-page-published.json")).unwrap();
    let landing = direct(Kind::Filter, r#".data.page_type == "landing" and .data.locale == null"#);
    assert_eq!(landing.filter(&page, VARS), Some(true));
    let es = direct(Kind::Filter, r#".data.locale == "es""#);
    assert_eq!(es.filter(&page, VARS), Some(false));
    assert_eq!(direct(Kind::Filter, r#"$event == "page.published""#).filter(&page, VARS), Some(true));
    assert_eq!(direct(Kind::Filter, ".data.buttercms_id > 5000").filter(&page, VARS), Some(true));
    assert_eq!(direct(Kind::Filter, ".data.nothing").filter(&page, VARS), Some(false));
    assert_eq!(direct(Kind::Filter, ".data.scheduled | not").filter(&page, VARS), Some(true));
    assert_eq!(direct(Kind::Key, ".data.id").key(&page, VARS), Some(Some("product-launch".into())));
    assert_eq!(direct(Kind::Key, ".data.locale").key(&page, VARS), Some(None));
    assert_eq!(direct(Kind::Key, ".data.locale // $event").key(&page, VARS), Some(Some("page.published".into())));
    assert_eq!(direct(Kind::Key, ".data.id == 1").key(&page, VARS), Some(Some("false".into())));
}

#[test]
fn what_jaq_must_decide_is_left_to_it() {
    let page = json!({"data": {"id": "x", "n": 1.5, "big": 1e30, "list": [1], "obj": {"a": 1}}});
    // Errors: indexing a string or a number, an array with a key, an object with an index.
    for text in [".data.id.x", ".data.n.x", ".data.list.x", ".data.obj[0]", ".data.id[0]"] {
        assert_eq!(direct(Kind::Filter, text).filter(&page, VARS), None, "{text}");
    }
    // Floats, and containers of one type compared.
    for text in [".data.n == 1", ".data.big > 1", ".data.list == [1] // true", ".data.obj == .data.obj"] {
        let Some(d) = Direct::compile(Kind::Filter, text) else { continue };
        assert_eq!(d.filter(&page, VARS), None, "{text}");
    }
    // A number's text is jaq's: a key that is a number is its answer.
    assert_eq!(direct(Kind::Key, ".data.list[0]").key(&page, VARS), None);
    // Types of different rank compare by rank, whatever they hold.
    assert_eq!(direct(Kind::Filter, ".data.obj > .data.list").filter(&page, VARS), Some(true));
    assert_eq!(direct(Kind::Filter, ".data.n > null").filter(&page, VARS), Some(true));
    // A short-circuit skips what would fail, as in jaq.
    assert_eq!(direct(Kind::Filter, "false and .data.id.x").filter(&page, VARS), Some(false));
    assert_eq!(direct(Kind::Filter, ".data.id or .data.id.x").filter(&page, VARS), Some(true));
}

/// A small deterministic generator (xorshift): the same cases on every run.
struct Gen(u64);

impl Gen {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }

    const KEYS: &'static [&'static str] = &["a", "b", "id", "x y"];
    const SCALARS: &'static [&'static str] = &[
        "null",
        "true",
        "false",
        "0",
        "1",
        "-1",
        "2",
        "1.0",
        "1.5",
        "-0.0",
        "9007199254740993",
        "18446744073709551615",
        "100000000000000000000000",
        "1e3",
        r#""""#,
        r#""a""#,
        r#""b""#,
        r#""é""#,
        r#""page.published""#,
        r#""buttercms""#,
    ];

    fn payload(&mut self, depth: usize) -> String {
        match if depth == 0 { 0 } else { self.below(6) } {
            0 => self.pick(Self::SCALARS).to_string(),
            1 => {
                let items: Vec<String> = (0..self.below(3)).map(|_| self.payload(depth - 1)).collect();
                format!("[{}]", items.join(","))
            }
            // Keys may repeat: the last one counts, in serde_json as in jaq.
            _ => {
                let fields: Vec<String> = (0..=self.below(4))
                    .map(|_| format!("{:?}:{}", self.pick(Self::KEYS), self.payload(depth - 1)))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }
        }
    }

    fn program(&mut self, depth: usize) -> String {
        const LITERALS: &[&str] =
            &["null", "true", "false", "0", "1", "-1", "2", "9007199254740993", r#""a""#, r#""""#, r#""é""#];
        if depth == 0 {
            return match self.below(4) {
                0 => self.pick(LITERALS).to_string(),
                1 => self.pick(&["$source", "$event"]).to_string(),
                _ => self.path(),
            };
        }
        let (l, r) = (self.program(depth - 1), self.program(depth - 1));
        match self.below(5) {
            0 => format!("({l}) {} ({r})", self.pick(&["==", "!=", "<", "<=", ">", ">="])),
            1 => format!("({l}) {} ({r})", self.pick(&["and", "or", "//"])),
            2 => format!("({l}) | not"),
            3 => format!("({l}) | {}", self.path()),
            _ => self.path(),
        }
    }

    fn path(&mut self) -> String {
        let mut path = String::new();
        for _ in 0..=self.below(2) {
            match self.below(8) {
                0 => path.push_str(&format!("[{}]", self.below(2))),
                1 => path.push_str(r#"."x y""#),
                2 => path.push_str(&format!(".{}?", self.pick(&["a", "b", "id"]))),
                _ => path.push_str(&format!(".{}", self.pick(&["a", "b", "id"]))),
            }
        }
        if path.starts_with('[') {
            path.insert(0, '.');
        }
        path
    }
}

/// Wherever the subset answers, it answers what jaq does; and it answers
/// most of the cases jaq answers without an error (a subset that deferred
/// on everything would pass the first half alone).
#[test]
fn answers_are_jaqs_on_generated_programs_and_payloads() {
    let mut gen = Gen(0x9e37_79b9_7f4a_7c15);
    let (mut cases, mut answered, mut failed) = (0, 0, 0);
    for _ in 0..400 {
        let text = gen.program(3);
        let jaq_filter = compile(Kind::Filter, &text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let filter = direct(Kind::Filter, &text);
        let key = direct(Kind::Key, &text);
        for _ in 0..25 {
            let body = gen.payload(3);
            let Ok(json) = serde_json::from_str::<Value>(&body) else { continue };
            let out = eval(&jaq_filter, body.as_bytes(), VARS);
            if matches!(out, Output::Failed(_)) {
                failed += 1;
            }
            cases += 1;
            if let Some(verdict) = filter.filter(&json, VARS) {
                answered += 1;
                assert_eq!(out.truthy(), Some(verdict), "filter {text} on {body}: jaq gave {out:?}");
            }
            if let Some(k) = key.key(&json, VARS) {
                assert!(!matches!(out, Output::Failed(_)), "key {text} on {body}: jaq failed: {out:?}");
                assert_eq!(out.key(), k, "key {text} on {body}: jaq gave {out:?}");
            }
        }
    }
    assert!(cases > 9_000, "{cases} cases");
    // Errors are jaq's to word: of the rest, most are answered here.
    assert!(failed > 1_000, "the errors are exercised too: {failed} of {cases}");
    assert!(answered * 2 > cases - failed, "answered {answered} of {cases}, jaq failed on {failed}");
}
