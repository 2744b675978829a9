//! Finding the ids in a list page's JSON.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::pagination::{describe, shorten};

/// The ids in `body`: the array at `ids_at` (a JSON pointer; empty for the top level),
/// each element either an id itself or an object holding it under `id_field`.
/// Also returns the array, for comparing pages.
pub(crate) fn ids<'a, Id: DeserializeOwned>(
    body: &'a Value,
    ids_at: &str,
    id_field: &str,
) -> Result<(Vec<Id>, &'a [Value]), String> {
    let place = || {
        if ids_at.is_empty() {
            "at the top level".to_owned()
        } else {
            format!("at {ids_at:?}")
        }
    };
    let items = match body.pointer(ids_at) {
        Some(Value::Array(items)) => items,
        Some(other) => {
            let hint = if ids_at.is_empty() && other.is_object() {
                " (set ids_at to the pointer of the array inside it, e.g. \"/data\")"
            } else {
                ""
            };
            return Err(format!(
                "expected an array of ids {}, found {}{hint}",
                place(),
                describe(other)
            ));
        }
        None => {
            return Err(format!(
                "found nothing {} (the body is {})",
                place(),
                describe(body)
            ));
        }
    };
    let ids = items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let id = match item {
                Value::Object(fields) => fields.get(id_field).ok_or_else(|| {
                    format!(
                        "item {index} of the array {} is {}, without an {id_field:?} field \
                         (see id_field)",
                        place(),
                        describe(item)
                    )
                })?,
                _ => item,
            };
            Id::deserialize(id)
                .or_else(|err| match id {
                    // `[1, 2, 3]` read as string ids: the number's text is the id.
                    Value::Number(number) => {
                        Id::deserialize(Value::String(number.to_string())).map_err(|_| err)
                    }
                    _ => Err(err),
                })
                .map_err(|err| {
                    format!(
                        "item {index} of the array {}: the id {} is not usable: {err}",
                        place(),
                        shorten(&id.to_string())
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    Ok((ids, items))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strings(body: Value, at: &str) -> Result<Vec<String>, String> {
        ids::<String>(&body, at, "id").map(|(ids, _)| ids)
    }

    #[test]
    fn bare_arrays_objects_and_wrapped_arrays() {
        assert_eq!(
            strings(json!(["student", "draw"]), "").unwrap(),
            ["student", "draw"]
        );
        let numbers = ids::<u64>(&json!([1, 2, 3]), "", "id").unwrap().0;
        assert_eq!(numbers, [1, 2, 3]);
        let objects = json!([{"id": "a", "title": "x"}, {"id": "b"}]);
        assert_eq!(strings(objects, "").unwrap(), ["a", "b"]);
        let wrapped = json!({"data": {"videos": [{"key": 7}]}});
        assert_eq!(ids::<u64>(&wrapped, "/data/videos", "key").unwrap().0, [7]);
    }

    #[test]
    fn wrong_shapes_say_where_and_what() {
        let err = strings(json!({"data": [], "meta": {}}), "").unwrap_err();
        assert!(
            err.contains("at the top level, found an object with keys data, meta"),
            "{err}"
        );
        assert!(err.contains("ids_at"), "{err}");
        let err = strings(json!({"data": []}), "/items").unwrap_err();
        assert!(err.contains("nothing at \"/items\""), "{err}");
        let err = strings(json!({"data": 5}), "/data").unwrap_err();
        assert!(err.contains("found a number"), "{err}");
        let err = strings(json!([{"id": "a"}, {"name": "b"}]), "").unwrap_err();
        assert!(
            err.contains("item 1") && err.contains("keys name") && err.contains("\"id\""),
            "{err}"
        );
        let err = ids::<u64>(&json!(["x"]), "", "id").unwrap_err();
        assert!(
            err.contains("the id \"x\" is not usable: invalid type: string"),
            "{err}"
        );
        let huge = json!([{ "id": { "blob": "z".repeat(10_000) } }]);
        let err = ids::<u64>(&huge, "", "id").unwrap_err();
        assert!(err.len() < 400, "{} bytes", err.len());
    }

    #[test]
    fn numbers_are_accepted_as_string_ids() {
        assert_eq!(strings(json!([1, 2]), "").unwrap(), ["1", "2"]);
        assert_eq!(strings(json!([{"id": 7}]), "").unwrap(), ["7"]);
    }
}
