//! The adapter's optional `task` entry (docs/SPEC.md, section 3): what the trained
//! model is for, so that a merge can rebuild it from the base checkpoint alone.
//!
//! ```json
//! "task": {
//!   "type": "sequence-classification",
//!   "config": {"architectures": ["BertForSequenceClassification"],
//!              "id2label": {"0": "negative", "1": "positive"}, ...},
//!   "new_tensors": ["classifier.bias", "classifier.weight"]
//! }
//! ```
//!
//! * `type`: `"sequence-classification"` or `"causal-lm"`;
//! * `config`: top-level keys a merge sets in the output's `config.json` (a JSON object;
//!   absent means none);
//! * `new_tensors`: tensors of the weights file (in `modules_to_save`) that the base
//!   checkpoint does not hold, such as a freshly trained head: a merge writes them into
//!   the output instead of refusing them as missing from the base.

use std::collections::HashSet;

use serde_json::{Map, Value, json};

use super::error::ConfigError;
use super::fingerprint::check_name;

/// The task types an adapter may record.
pub const TASK_TYPES: [&str; 2] = ["sequence-classification", "causal-lm"];

const TASK_KEYS: [&str; 3] = ["type", "config", "new_tensors"];

/// A checked `task` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// One of [`TASK_TYPES`].
    pub kind: String,
    /// Keys to set in the merged model's `config.json`.
    pub config: Map<String, Value>,
    /// Weights-file tensors that the base does not hold (written by a merge).
    pub new_tensors: Vec<String>,
}

impl Task {
    /// Checks a `task` value; `Ok(None)` for an absent or null entry.
    pub fn from_value(value: Option<&Value>) -> std::result::Result<Option<Task>, ConfigError> {
        let obj = match value {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(obj)) => obj,
            Some(other) => {
                return Err(ConfigError::invalid("task", "an object", other.to_string()));
            }
        };
        if let Some(key) = obj.keys().find(|k| !TASK_KEYS.contains(&k.as_str())) {
            return Err(ConfigError::UnknownTaskKey {
                key: key.clone(),
                known: &TASK_KEYS,
            });
        }
        let kind = match obj.get("type") {
            Some(Value::String(s)) if TASK_TYPES.contains(&s.as_str()) => s.clone(),
            other => {
                return Err(ConfigError::invalid(
                    "task.type",
                    format!("one of {}", TASK_TYPES.join(", ")),
                    other.map_or_else(|| "nothing".to_string(), Value::to_string),
                ));
            }
        };
        let config = match obj.get("config") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(other) => {
                return Err(ConfigError::invalid(
                    "task.config",
                    "an object",
                    other.to_string(),
                ));
            }
        };
        Ok(Some(Task {
            kind,
            config,
            new_tensors: new_tensors(obj.get("new_tensors"))?,
        }))
    }

    /// The JSON value of this entry.
    pub fn to_value(&self) -> Value {
        json!({
            "type": self.kind,
            "config": self.config,
            "new_tensors": self.new_tensors,
        })
    }

    /// True when `name` is one of the new tensors.
    pub fn is_new(&self, name: &str) -> bool {
        self.new_tensors.iter().any(|n| n == name)
    }
}

/// `new_tensors`: distinct non-empty names free of control characters.
fn new_tensors(value: Option<&Value>) -> std::result::Result<Vec<String>, ConfigError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ConfigError::invalid(
                "task.new_tensors",
                "a list",
                other.to_string(),
            ));
        }
    };
    let mut seen = HashSet::new();
    let mut names = Vec::with_capacity(items.len());
    for item in items {
        let Some(name) = item.as_str().filter(|s| !s.is_empty()) else {
            return Err(ConfigError::NewTensorName {
                got: item.to_string(),
            });
        };
        check_name(name).map_err(|e| e.at("task.new_tensors"))?;
        if !seen.insert(name) {
            let name = name.to_string();
            return Err(ConfigError::DuplicateNewTensor { name });
        }
        names.push(name.to_string());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> std::result::Result<Option<Task>, String> {
        Task::from_value(Some(&v)).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_entry_round_trips() {
        let v = json!({"type": "sequence-classification",
                       "config": {"architectures": ["X"], "id2label": {"0": "a"}},
                       "new_tensors": ["classifier.weight", "classifier.bias"]});
        let task = parse(v.clone()).unwrap().unwrap();
        assert_eq!(task.kind, "sequence-classification");
        assert!(task.is_new("classifier.bias") && !task.is_new("classifier"));
        assert_eq!(task.to_value(), v);
        assert_eq!(Task::from_value(None).unwrap(), None);
        assert_eq!(parse(Value::Null).unwrap(), None);
        let bare = parse(json!({"type": "causal-lm"})).unwrap().unwrap();
        assert!(bare.config.is_empty() && bare.new_tensors.is_empty());
    }

    #[test]
    fn bad_entries_name_the_problem() {
        let cases = [
            (json!(3), "task must be an object"),
            (json!({"type": "regression"}), "task.type must be one of"),
            (json!({}), "task.type must be one of"),
            (
                json!({"type": "causal-lm", "extra": 1}),
                "unknown key \"extra\"",
            ),
            (
                json!({"type": "causal-lm", "config": [1]}),
                "task.config must be an object",
            ),
            (
                json!({"type": "causal-lm", "new_tensors": "x"}),
                "must be a list",
            ),
            (
                json!({"type": "causal-lm", "new_tensors": [""]}),
                "non-empty strings",
            ),
            (
                json!({"type": "causal-lm", "new_tensors": ["a", "a"]}),
                "twice",
            ),
            (
                json!({"type": "causal-lm", "new_tensors": ["a\nb"]}),
                "task.new_tensors",
            ),
        ];
        for (value, want) in cases {
            let err = parse(value.clone()).unwrap_err();
            assert!(err.contains(want), "{value}: {err}");
        }
    }
}
