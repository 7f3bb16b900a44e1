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

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

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
