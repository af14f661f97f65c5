//! Payload filters in the spirit of Qdrant's: match on keyword, integer and bool fields,
//! numeric ranges, and `and`/`or`/`not` combinations, evaluated on JSON payloads.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A condition on a point's JSON payload. Field paths use dots for nesting (`meta.lang`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// The field equals this keyword, integer or bool (or, for an array field, contains it).
    Match {
        key: String,
        value: Value,
    },
    /// The numeric field lies within the given bounds.
    Range {
        key: String,
        #[serde(default)]
        gt: Option<f64>,
        #[serde(default)]
        gte: Option<f64>,
        #[serde(default)]
        lt: Option<f64>,
        #[serde(default)]
        lte: Option<f64>,
    },
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
}

impl Filter {
    pub fn matches(key: impl Into<String>, value: impl Into<Value>) -> Self {
        Filter::Match {
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn range(key: impl Into<String>, gte: Option<f64>, lt: Option<f64>) -> Self {
        Filter::Range {
            key: key.into(),
            gt: None,
            gte,
            lt,
            lte: None,
        }
    }

    /// Whether `payload` satisfies the filter. Missing fields satisfy no `Match` or `Range`.
    pub fn check(&self, payload: &Value) -> bool {
        match self {
            Filter::Match { key, value } => match field(payload, key) {
                Some(Value::Array(items)) => items.iter().any(|item| item == value),
                Some(found) => json_eq(found, value),
                None => false,
            },
            Filter::Range {
                key,
                gt,
                gte,
                lt,
                lte,
            } => match field(payload, key).and_then(Value::as_f64) {
                Some(x) => {
                    gt.is_none_or(|b| x > b)
                        && gte.is_none_or(|b| x >= b)
                        && lt.is_none_or(|b| x < b)
                        && lte.is_none_or(|b| x <= b)
                }
                None => false,
            },
            Filter::And(all) => all.iter().all(|f| f.check(payload)),
            Filter::Or(any) => any.iter().any(|f| f.check(payload)),
            Filter::Not(inner) => !inner.check(payload),
        }
    }
}

/// Numbers compare by value (1 == 1.0), everything else structurally.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn field<'a>(payload: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(payload, |value, key| value.get(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions() {
        let p = json!({"lang": "en", "year": 2021, "draft": false, "tags": ["a", "b"], "meta": {"n": 3}});
        assert!(Filter::matches("lang", "en").check(&p));
        assert!(!Filter::matches("lang", "fr").check(&p));
        assert!(Filter::matches("year", 2021).check(&p));
        assert!(Filter::matches("draft", false).check(&p));
        assert!(Filter::matches("tags", "b").check(&p));
        assert!(Filter::matches("meta.n", 3).check(&p));
        assert!(!Filter::matches("missing", 1).check(&p));
        assert!(Filter::range("year", Some(2020.0), Some(2022.0)).check(&p));
        assert!(!Filter::range("year", Some(2022.0), None).check(&p));
        assert!(!Filter::range("lang", None, None).check(&p));
        let both = Filter::And(vec![
            Filter::matches("lang", "en"),
            Filter::Not(Box::new(Filter::matches("draft", true))),
        ]);
        assert!(both.check(&p));
        let either = Filter::Or(vec![
            Filter::matches("lang", "fr"),
            Filter::matches("year", 1999),
        ]);
        assert!(!either.check(&p));
    }

    #[test]
    fn deserializes_from_json() {
        let f: Filter = serde_json::from_value(json!({"and": [
            {"match": {"key": "lang", "value": "en"}},
            {"range": {"key": "year", "gte": 2000}},
            {"not": {"match": {"key": "draft", "value": true}}}
        ]}))
        .unwrap();
        assert!(f.check(&json!({"lang": "en", "year": 2001, "draft": false})));
    }
}
