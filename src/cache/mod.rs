//! The edge's shared HTTP cache: RFC 9111 policy ([`policy`]) on pingora-cache.

pub mod policy;
pub mod store;
