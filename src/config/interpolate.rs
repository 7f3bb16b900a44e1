//! `${VAR}` and `${VAR:-default}` substitution over every string of the parsed YAML tree.

use serde_yaml::Value;

/// Replaces `${VAR}` / `${VAR:-default}` in every string value of `value`,
/// reading variables through `lookup`. `$${` stands for a literal `${`.
/// Returns every problem found, each with the key path where it was found.
pub fn interpolate_tree(value: &mut Value, lookup: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    walk(value, String::new(), lookup, &mut problems);
    problems
}

fn walk(
    value: &mut Value,
    path: String,
    lookup: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<(String, String)>,
) {
    match value {
        Value::String(s) => match interpolate(s, lookup) {
            Ok(Some(replaced)) => *s = replaced,
            Ok(None) => {}
            Err(message) => problems.push((path, message)),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                walk(item, format!("{path}[{i}]"), lookup, problems);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let key = match key {
                    Value::String(k) => k.clone(),
                    other => format!("{other:?}"),
                };
                let child = if path.is_empty() { key } else { format!("{path}.{key}") };
                walk(item, child, lookup, problems);
            }
        }
        Value::Tagged(tagged) => walk(&mut tagged.value, path, lookup, problems),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Substitutes one string. `Ok(None)` when it holds no `${`.
pub fn interpolate(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<String>, String> {
    if !input.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            // `$${` is an escaped, literal `${`.
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unterminated `${{` in {input:?}"))?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (expr, None),
        };
        if !is_var_name(name) {
            return Err(format!("`${{{expr}}}` is not a valid variable reference"));
        }
        // Shell semantics: the default applies when the variable is unset or empty.
        match (lookup(name).filter(|v| !v.is_empty() || default.is_none()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!("environment variable {name} is not set (use ${{{name}:-default}} for a default)"))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Some(out))
}

/// The values a config took from the environment, shown by their names
/// (`${NAME}`) wherever the config is printed or an error quotes one: they
/// are often secrets (a signing secret, a webhook URL whose path is its
/// credential). Its `Debug` names the variables only.
#[derive(Clone, Default)]
pub struct EnvValues(Vec<(String, String)>);

impl EnvValues {
    /// Shorter values are left as they are: no secret is that short, and
    /// they would be found inside unrelated words.
    const SHORTEST: usize = 4;

    pub fn note(&mut self, name: &str, value: &str) {
        if value.len() >= Self::SHORTEST && !self.0.iter().any(|(n, _)| n == name) {
            self.0.push((name.to_string(), value.to_string()));
            // Longest first: a value that holds another is replaced whole.
            self.0.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        }
    }

    /// `text` with each value, as it is and as `{:?}` escapes it inside
    /// quotes, replaced by `${NAME}`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (name, value) in &self.0 {
            let shown = format!("${{{name}}}");
            out = out.replace(value.as_str(), &shown);
            let escaped = format!("{value:?}");
            if let Some(inner) = escaped.strip_prefix('"').and_then(|e| e.strip_suffix('"')) {
                out = out.replace(inner, &shown);
            }
        }
        out
    }
}

impl std::fmt::Debug for EnvValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(name, _)| name)).finish()
    }
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_from_the_environment_are_shown_by_name() {
        let mut values = EnvValues::default();
        values.note("HOOK", "https://hooks.example/T0/B0/s3cr3t\n");
        values.note("PATH_PART", "T0/B0");
        values.note("ON", "on");
        let message = r#"invalid type: string "https://hooks.example/T0/B0/s3cr3t\n", expected a sequence; T0/B0 on"#;
        assert_eq!(values.redact(message), "invalid type: string \"${HOOK}\", expected a sequence; ${PATH_PART} on");
        let raw = "https://hooks.example/T0/B0/s3cr3t\n is not a URL";
        assert_eq!(values.redact(raw), "${HOOK} is not a URL");
        assert_eq!(format!("{values:?}"), r#"["HOOK", "PATH_PART"]"#);
    }

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_variables_and_defaults() {
        assert_eq!(interpolate("a${SET}b", &env).unwrap().unwrap(), "avalueb");
        assert_eq!(interpolate("${NOPE:-x:y}", &env).unwrap().unwrap(), "x:y");
        assert_eq!(interpolate("${EMPTY:-d}", &env).unwrap().unwrap(), "d");
        assert_eq!(interpolate("${EMPTY}", &env).unwrap().unwrap(), "");
        assert_eq!(interpolate("${SET}${SET}", &env).unwrap().unwrap(), "valuevalue");
        assert_eq!(interpolate("plain $ text", &env).unwrap(), None);
    }

    #[test]
    fn escaped_dollar_is_literal() {
        assert_eq!(interpolate("$${SET}", &env).unwrap().unwrap(), "${SET}");
    }

    #[test]
    fn missing_variable_is_named() {
        let err = interpolate("${MISSING_SECRET}", &env).unwrap_err();
        assert!(err.contains("MISSING_SECRET"), "{err}");
        assert!(interpolate("${unterminated", &env).is_err());
        assert!(interpolate("${1BAD}", &env).is_err());
    }

    #[test]
    fn tree_errors_carry_the_key_path() {
        let mut v: Value = serde_yaml::from_str("targets:\n  - headers: { K: \"${NOPE}\" }\n").unwrap();
        let problems = interpolate_tree(&mut v, &env);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "targets[0].headers.K");
    }
}
