//! Request JSON decoded compactly and strictly.
//!
//! `serde_json::Value` spends 32+ bytes on every number; a 256-image batch (200,704 pixels)
//! became ~20 MB of tree per request, and 64 such requests at once peaked at 1.4 GB. Here an
//! array of numbers is one `Vec<f64>` (8 bytes a number), and a key repeated in one object is
//! refused (400) instead of silently keeping the last value.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// A JSON document; arrays made only of numbers are [`Json::Nums`].
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    /// An array whose items are all numbers (including the empty array).
    Nums(Vec<f64>),
    /// Any other array.
    Arr(Vec<Json>),
    /// An object, keys in document order, each key once.
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Parses a request body.
    pub fn parse(bytes: &[u8]) -> Result<Json, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The value of `key` in an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn is_object(&self) -> bool {
        matches!(self, Json::Obj(_))
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Number of items when this is an array.
    pub fn array_len(&self) -> Option<usize> {
        match self {
            Json::Nums(v) => Some(v.len()),
            Json::Arr(v) => Some(v.len()),
            _ => None,
        }
    }

    /// Converts to `serde_json::Value` (for echoing small values such as a request id).
    pub fn to_value(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Num(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
            Json::Str(s) => Value::String(s.clone()),
            Json::Nums(v) => Value::Array(v.iter().map(|&x| Json::Num(x).to_value()).collect()),
            Json::Arr(v) => Value::Array(v.iter().map(Json::to_value).collect()),
            Json::Obj(e) => {
                Value::Object(e.iter().map(|(k, v)| (k.clone(), v.to_value())).collect())
            }
        }
    }
}

/// Short JSON text for error messages (long values are cut).
impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.to_value().to_string();
        if text.chars().count() > 60 {
            let cut: String = text.chars().take(57).collect();
            write!(f, "{cut}...")
        } else {
            f.write_str(&text)
        }
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Num(v as f64))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Num(v as f64))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(Json::Num(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut nums = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(item) = seq.next_element::<Json>()? {
            match item {
                Json::Num(x) => nums.push(x),
                other => {
                    // Mixed array: fall back to the general form.
                    let mut items: Vec<Json> = nums.into_iter().map(Json::Num).collect();
                    items.push(other);
                    while let Some(item) = seq.next_element::<Json>()? {
                        items.push(item);
                    }
                    return Ok(Json::Arr(items));
                }
            }
        }
        Ok(Json::Nums(nums))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries: Vec<(String, Json)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if entries.iter().any(|(k, _)| *k == key) {
                let shown: String = key.chars().take(40).collect();
                return Err(de::Error::custom(format!("duplicate key {shown:?}")));
            }
            let value = map.next_value::<Json>()?;
            entries.push((key, value));
        }
        Ok(Json::Obj(entries))
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_arrays_are_compact_and_mixed_arrays_are_kept() {
        let j =
            Json::parse(br#"{"a": [1, 2.5, -3], "b": [1, "x", null], "c": [], "d": {"e": true}}"#)
                .unwrap();
        assert_eq!(j.get("a"), Some(&Json::Nums(vec![1.0, 2.5, -3.0])));
        assert_eq!(
            j.get("b"),
            Some(&Json::Arr(vec![
                Json::Num(1.0),
                Json::Str("x".into()),
                Json::Null
            ]))
        );
        assert_eq!(j.get("c").unwrap().array_len(), Some(0));
        assert_eq!(j.get("d").unwrap().get("e"), Some(&Json::Bool(true)));
        assert_eq!(Json::Str("x".into()).to_string(), "\"x\"");
    }

    #[test]
    fn duplicate_keys_and_non_json_numbers_are_refused() {
        let err = Json::parse(br#"{"image": [1], "image": [2]}"#).unwrap_err();
        assert!(err.to_string().contains("duplicate key \"image\""), "{err}");
        let err = Json::parse(br#"{"a": {"x": 1, "x": 2}}"#).unwrap_err();
        assert!(err.to_string().contains("duplicate key"), "{err}");
        for bad in ["[NaN]", "[Infinity]", "[1e309]", "[-1e400]", "[01]", "[1,]"] {
            assert!(Json::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        // serde_json's recursion limit stops deeply nested input.
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(Json::parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let j = Json::Str("x".repeat(500));
        assert!(j.to_string().len() < 70);
    }
}
