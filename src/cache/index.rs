//! Types both cache tiers share: the serialized meta of a stored response and the
//! index from primary keys to the hashes stored under them. Their own home, so the
//! memory tier (`storage`) and the disk tier (`disk`) each depend on it and not on
//! each other's internals.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

use pingora::cache::key::HashBinary;

/// Serialized `CacheMeta`: `CacheMeta::serialize()` output.
pub(crate) type BinaryMeta = (Vec<u8>, Vec<u8>);

/// Index from primary key strings to the hashes stored under them (one per Vary variant).
#[derive(Default)]
pub(crate) struct PrimaryIndex {
    map: BTreeMap<Arc<str>, Vec<HashBinary>>,
}

impl PrimaryIndex {
    pub(crate) fn insert(&mut self, primary: &Arc<str>, hash: HashBinary) {
        let v = self.map.entry(primary.clone()).or_default();
        if !v.contains(&hash) {
            v.push(hash);
        }
    }

    pub(crate) fn remove(&mut self, primary: &str, hash: &HashBinary) {
        if let Some(v) = self.map.get_mut(primary) {
            v.retain(|h| h != hash);
            if v.is_empty() {
                self.map.remove(primary);
            }
        }
    }

    pub(crate) fn with_prefix(&self, prefix: &str, out: &mut HashSet<HashBinary>) {
        for (k, v) in self
            .map
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        {
            if !k.starts_with(prefix) {
                break;
            }
            out.extend(v.iter().copied());
        }
    }

    pub(crate) fn exact(&self, primary: &str, out: &mut HashSet<HashBinary>) {
        if let Some(v) = self.map.get(primary) {
            out.extend(v.iter().copied());
        }
    }
}
