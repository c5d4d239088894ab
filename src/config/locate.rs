//! Finding the line of a key in the configuration text, so every problem can name it.

use std::fmt;

use toml_edit::{ImDocument, Item, Value};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A path to a key, such as `upstreams[0].servers[1].address`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Segment>);

impl KeyPath {
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }

    /// This path followed by a key.
    pub fn key(&self, k: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Segment::Key(k.to_owned()));
        KeyPath(v)
    }

    /// This path followed by an array index.
    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Segment::Index(i));
        KeyPath(v)
    }

    pub(crate) fn from_ignored(p: &serde_ignored::Path<'_>) -> Self {
        fn walk(p: &serde_ignored::Path<'_>, out: &mut Vec<Segment>) {
            use serde_ignored::Path as P;
            match p {
                P::Root => {}
                P::Seq { parent, index } => {
                    walk(parent, out);
                    out.push(Segment::Index(*index));
                }
                P::Map { parent, key } => {
                    walk(parent, out);
                    out.push(Segment::Key(key.clone()));
                }
                P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                    walk(parent, out)
                }
            }
        }
        let mut out = Vec::new();
        walk(p, &mut out);
        KeyPath(out)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// 1-based line of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The bare key assigned on a line (`read = "x"` -> `read`), or "" when there is none.
pub fn key_on_line(text: &str, line: usize) -> String {
    let Some(l) = text.lines().nth(line.saturating_sub(1)) else {
        return String::new();
    };
    let l = l.trim_start().trim_start_matches('{').trim_start();
    match l.split_once('=') {
        Some((k, _)) if !k.trim().is_empty() && !k.contains('"') => k.trim().to_owned(),
        _ => String::new(),
    }
}

/// The line of the deepest part of `path` found in the document (the key itself when
/// it exists, else its closest existing parent).
pub fn line_of_path(doc: &ImDocument<String>, text: &str, path: &KeyPath) -> Option<usize> {
    let mut best: Option<std::ops::Range<usize>> = None;
    let mut cur = Node::Item(doc.as_item());
    for seg in &path.0 {
        let (next, span) = match (cur, seg) {
            (Node::Item(item), Segment::Key(k)) => match item {
                Item::Table(t) => match t.get_key_value(k) {
                    Some((key, item)) => (Node::Item(item), key.span()),
                    None => break,
                },
                Item::Value(Value::InlineTable(t)) => match t.get_key_value(k) {
                    Some((key, v)) => (Node::Item(v), key.span()),
                    None => break,
                },
                _ => break,
            },
            (Node::Value(Value::InlineTable(t)), Segment::Key(k)) => match t.get_key_value(k) {
                Some((key, v)) => (Node::Item(v), key.span()),
                None => break,
            },
            (Node::Item(Item::ArrayOfTables(a)), Segment::Index(i)) => match a.get(*i) {
                Some(t) => (Node::Table(t), t.span()),
                None => break,
            },
            (Node::Item(Item::Value(Value::Array(a))), Segment::Index(i))
            | (Node::Value(Value::Array(a)), Segment::Index(i)) => match a.get(*i) {
                Some(v) => (Node::Value(v), v.span()),
                None => break,
            },
            (Node::Table(t), Segment::Key(k)) => match t.get_key_value(k) {
                Some((key, item)) => (Node::Item(item), key.span()),
                None => break,
            },
            _ => break,
        };
        if span.is_some() {
            best = span;
        }
        cur = next;
    }
    best.map(|s| line_of(text, s.start))
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Value(&'a Value),
    Table(&'a toml_edit::Table),
}
