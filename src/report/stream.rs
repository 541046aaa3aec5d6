//! JSON reports streamed to a writer: a tree whose small parts are `serde_json` values
//! and whose matrices are borrowed and written row by row, so that printing an M×M
//! kernel needs no memory beyond one row (issue 13; a `Value` of the same report holds
//! every entry as a boxed number, ≈ 28 M×M matrices' worth at M = 2000).
//!
//! The bytes are those of `serde_json::to_string_pretty` of the equivalent `Value`
//! (objects keep insertion order: serde_json's `preserve_order`).

use nalgebra::DMatrix;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

use super::limit::num;

/// A JSON report: values, borrowed matrices (an array of rows) and objects in order.
pub enum Node<'a> {
    Value(Value),
    Matrix(&'a DMatrix<f64>),
    Object(Vec<(String, Node<'a>)>),
}

impl<'a> Node<'a> {
    /// An empty object, filled with [`Node::push`].
    pub fn object() -> Self {
        Node::Object(Vec::new())
    }

    /// Appends `key: value` to an object (ignored on a non-object).
    pub fn push(&mut self, key: &str, value: impl Into<Node<'a>>) {
        if let Node::Object(v) = self {
            v.push((key.to_string(), value.into()));
        }
    }

    /// The equivalent `serde_json::Value` (for the library and small reports).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Writes the report pretty-printed, as `serde_json::to_writer_pretty` of
    /// [`Node::to_value`] would, followed by a newline.
    pub fn write_pretty(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        serde_json::to_writer_pretty(&mut *w, self).map_err(std::io::Error::other)?;
        w.write_all(b"\n")
    }
}

impl From<Value> for Node<'_> {
    fn from(v: Value) -> Self {
        Node::Value(v)
    }
}

impl<'a> From<&'a DMatrix<f64>> for Node<'a> {
    fn from(m: &'a DMatrix<f64>) -> Self {
        Node::Matrix(m)
    }
}

impl<'a> From<Option<&'a DMatrix<f64>>> for Node<'a> {
    fn from(m: Option<&'a DMatrix<f64>>) -> Self {
        m.map_or(Node::Value(Value::Null), Node::Matrix)
    }
}

/// Row `i` of a matrix as a JSON array.
struct Row<'a>(&'a DMatrix<f64>, usize);

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (m, i) = (self.0, self.1);
        let mut seq = s.serialize_seq(Some(m.ncols()))?;
        for j in 0..m.ncols() {
            seq.serialize_element(&num(m[(i, j)]))?;
        }
        seq.end()
    }
}

impl Serialize for Node<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Value(v) => v.serialize(s),
            Node::Matrix(m) => {
                let mut seq = s.serialize_seq(Some(m.nrows()))?;
                for i in 0..m.nrows() {
                    seq.serialize_element(&Row(m, i))?;
                }
                seq.end()
            }
            Node::Object(kv) => {
                let mut map = s.serialize_map(Some(kv.len()))?;
                for (k, v) in kv {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}
