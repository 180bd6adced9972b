//! Correlating old and new values on update (validation ratcheting and CEL transition rules).

use serde_json::Value;

use super::node::Node;

/// The key of a list-type map element: the values of its key fields (`None`: absent).
fn element_key<'a>(keys: &[String], item: &'a Value) -> Option<Vec<Option<&'a Value>>> {
    let obj = item.as_object()?;
    Some(keys.iter().map(|k| obj.get(k)).collect())
}

/// The element of the old list-type map with the same key as `item` (`MapList.Get`).
pub(crate) fn map_list_get<'a>(keys: &[String], old: &'a [Value], item: &Value) -> Option<&'a Value> {
    if keys.is_empty() {
        return None;
    }
    let k = element_key(keys, item)?;
    old.iter().find(|o| element_key(keys, o).as_ref() == Some(&k))
}

/// The old value correlated with the `i`-th element of `new` for schema ratcheting
/// (`correlateOldValueForChildAtNewIndex`): by key for list-type map, by index for lists
/// without a list type, none for set and atomic lists.
pub(crate) fn correlate_index<'a>(s: &Node, new: &[Value], old: &'a [Value], i: usize) -> Option<&'a Value> {
    let item = new.get(i)?;
    match s.list_type.as_deref() {
        Some("map") => map_list_get(&s.list_map_keys, old, item),
        Some("set") | Some("atomic") => None,
        _ => old.get(i),
    }
}

/// `CachedDeepEqual` of schema ratcheting: deep equality, except that elements which cannot
/// be correlated (set and atomic lists, fields the schema does not know) make values unequal.
pub(crate) fn schema_equal(s: &Node, new: &Value, old: &Value, depth: usize) -> bool {
    if depth > 512 {
        return false;
    }
    match (new, old) {
        (Value::Null, Value::Null) => true,
        (Value::Array(n), Value::Array(o)) => {
            if n.len() != o.len() {
                return false;
            }
            if n.is_empty() {
                return true;
            }
            let Some(items) = s.items.as_deref() else { return false };
            let mut correlated = 0;
            for i in 0..n.len() {
                match correlate_index(s, n, o, i) {
                    Some(ov) => {
                        correlated += 1;
                        if !schema_equal(items, &n[i], ov, depth + 1) {
                            return false;
                        }
                    }
                    None => return false,
                }
            }
            correlated == o.len()
        }
        (Value::Object(n), Value::Object(o)) => {
            if n.len() != o.len() {
                return false;
            }
            if n.is_empty() {
                return true;
            }
            let count = n.len() as i64;
            if s.min_properties.is_some_and(|m| count < m) || s.max_properties.is_some_and(|m| count > m) {
                // The object validator stops before visiting the children.
                return false;
            }
            for (k, ov) in o {
                let Some(nv) = n.get(k) else { return false };
                let Some(child) = s.child_schema(k) else { return false };
                if !schema_equal(child, nv, ov, depth + 1) {
                    return false;
                }
            }
            true
        }
        _ => new == old,
    }
}
