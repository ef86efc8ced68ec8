//! Typed command arguments: a command's arguments deserialized (serde) into its argument
//! struct, with the errors QEMU gives for them ("Parameter 'file.filename' is missing",
//! "Invalid parameter type for 'id', expected: string", "Parameter 'x' is unexpected").
//! Argument structs use `#[serde(deny_unknown_fields)]` and the QMP member names.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::protocol::QmpError;

/// `args` as a `T`, or the QEMU-style error for the first member that does not fit.
pub fn parse_args<T: DeserializeOwned>(args: &Map<String, Value>) -> Result<T, QmpError> {
    let value = Value::Object(args.clone());
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        QmpError::generic(describe(&path, &e.inner().to_string()))
    })
}

/// The QEMU wording of serde's `message` about the member at `path` ("" for the top level).
fn describe(path: &str, message: &str) -> String {
    let join = |name: &str| {
        if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        }
    };
    let quoted = |m: &str| m.split('`').nth(1).map(str::to_string);
    if let Some(rest) = message.strip_prefix("missing field ") {
        return format!(
            "Parameter '{}' is missing",
            join(&quoted(rest).unwrap_or_default())
        );
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        // The path already ends at the unknown member.
        let name = match path {
            "" => quoted(rest).unwrap_or_default(),
            p => p.to_string(),
        };
        return format!("Parameter '{name}' is unexpected");
    }
    if let Some((_, expected)) = message.split_once(", expected ") {
        let expected = match expected {
            e if e.contains("string") => "string",
            e if e.contains("bool") => "boolean",
            e if e.contains("integer") || e.starts_with('u') || e.starts_with('i') => "integer",
            _ => "object",
        };
        return format!("Invalid parameter type for '{path}', expected: {expected}");
    }
    format!("Parameter '{path}': {message}")
}

/// A command without arguments.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        filename: String,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Args {
        id: String,
        flag: Option<bool>,
        count: Option<u64>,
        file: Option<Inner>,
    }

    fn err(v: Value) -> String {
        let Value::Object(m) = v else { panic!() };
        parse_args::<Args>(&m).unwrap_err().desc
    }

    #[test]
    fn errors_in_qemus_words() {
        assert_eq!(err(json!({})), "Parameter 'id' is missing");
        assert_eq!(
            err(json!({"id": 1})),
            "Invalid parameter type for 'id', expected: string"
        );
        assert_eq!(
            err(json!({"id": "a", "x": 1})),
            "Parameter 'x' is unexpected"
        );
        assert_eq!(
            err(json!({"id": "a", "flag": "yes"})),
            "Invalid parameter type for 'flag', expected: boolean"
        );
        assert_eq!(
            err(json!({"id": "a", "count": -1})),
            "Invalid parameter type for 'count', expected: integer"
        );
        assert_eq!(
            err(json!({"id": "a", "file": {}})),
            "Parameter 'file.filename' is missing"
        );
        assert_eq!(
            err(json!({"id": "a", "file": {"filename": "f", "y": 2}})),
            "Parameter 'file.y' is unexpected"
        );
        assert_eq!(
            err(json!({"id": "a", "file": 3})),
            "Invalid parameter type for 'file', expected: object"
        );
        let Value::Object(m) = json!({"id": "a", "file": {"filename": "f"}}) else {
            panic!()
        };
        assert!(parse_args::<Args>(&m).is_ok());
    }
}
