//! Route matching: from a request's host and path to one route.
//!
//! Host specificity comes first: routes for the exact host, then routes for the
//! longest matching `*.suffix` wildcard, then routes without a host. Within the most
//! specific host class that has a route whose `path_prefix` the path starts with, the
//! longest prefix wins. Matching is a plain byte-prefix test (like nginx's prefix
//! `location`), on the path without the query.

use std::collections::HashMap;

/// Routes grouped for matching; the values are route indices in the snapshot.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, Vec<(String, usize)>>,
    /// (".example.com", routes), longest suffix first.
    wildcard: Vec<(String, Vec<(String, usize)>)>,
    any: Vec<(String, usize)>,
}

impl Router {
    /// `routes[i]` is `(host pattern, path prefix)` of route i.
    pub fn new<'a>(routes: impl IntoIterator<Item = (Option<&'a str>, &'a str)>) -> Router {
        let mut r = Router::default();
        for (i, (host, prefix)) in routes.into_iter().enumerate() {
            let entry = (prefix.to_owned(), i);
            match host.map(normalize_host) {
                None => r.any.push(entry),
                Some(h) => {
                    if let Some(suffix) = h.strip_prefix('*') {
                        match r.wildcard.iter_mut().find(|(s, _)| s == suffix) {
                            Some((_, v)) => v.push(entry),
                            None => r.wildcard.push((suffix.to_owned(), vec![entry])),
                        }
                    } else {
                        r.exact.entry(h).or_default().push(entry);
                    }
                }
            }
        }
        let by_len = |v: &mut Vec<(String, usize)>| v.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
        r.exact.values_mut().for_each(by_len);
        r.wildcard.iter_mut().for_each(|(_, v)| by_len(v));
        by_len(&mut r.any);
        r.wildcard.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
        r
    }

    /// The route for `host` (as sent: any case, maybe with a port) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
        let longest = |v: &[(String, usize)]| {
            v.iter()
                .find(|(prefix, _)| path.starts_with(prefix.as_str()))
                .map(|&(_, i)| i)
        };
        if let Some(host) = host.map(canonical_host) {
            let host: &str = &host;
            if let Some(i) = self.exact.get(host).and_then(|v| longest(v)) {
                return Some(i);
            }
            for (suffix, v) in &self.wildcard {
                if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                    if let Some(i) = longest(v) {
                        return Some(i);
                    }
                }
            }
        }
        longest(&self.any)
    }
}

fn normalize_host(h: &str) -> String {
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// Like [`normalize_host`], without allocating for the usual lower-case host.
fn normalize_host_cow(h: &str) -> std::borrow::Cow<'_, str> {
    let h = h.trim_end_matches('.');
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(h.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(h)
    }
}

/// A Host value as routing and the cache key see it: port stripped, trailing dots
/// removed, lower case (`Chat.Example.com.:8080` -> `chat.example.com`).
pub fn canonical_host(h: &str) -> std::borrow::Cow<'_, str> {
    normalize_host_cow(strip_port(h))
}

/// `example.com:8080` -> `example.com`; `[::1]:80` -> `[::1]`.
pub fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return match h.find(']') {
            Some(end) => &h[..=end],
            None => h,
        };
    }
    match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new([
            (None, "/"),                          // 0
            (None, "/api/"),                      // 1
            (Some("chat.example.com"), "/"),      // 2
            (Some("chat.example.com"), "/ws"),    // 3
            (Some("*.example.com"), "/"),         // 4
            (Some("*.eu.example.com"), "/"),      // 5
            (Some("static.example.com"), "/img"), // 6
        ])
    }

    #[test]
    fn longest_prefix_wins_among_routes_of_any_host() {
        let r = router();
        assert_eq!(r.find(None, "/api/messages"), Some(1));
        assert_eq!(r.find(None, "/apix"), Some(0));
        assert_eq!(r.find(Some("other.org"), "/api/"), Some(1));
    }

    #[test]
    fn exact_host_beats_wildcard_which_beats_any_host() {
        let r = router();
        assert_eq!(r.find(Some("chat.example.com"), "/ws/1"), Some(3));
        assert_eq!(r.find(Some("CHAT.example.com:8080"), "/x"), Some(2));
        assert_eq!(r.find(Some("img.example.com"), "/x"), Some(4));
        assert_eq!(r.find(Some("a.eu.example.com"), "/x"), Some(5));
        assert_eq!(r.find(Some("example.com"), "/api/x"), Some(1));
    }

    #[test]
    fn a_host_whose_prefixes_do_not_match_falls_back_to_less_specific_routes() {
        let r = router();
        // static.example.com only has /img: /css falls to the wildcard route
        assert_eq!(r.find(Some("static.example.com"), "/css/a.css"), Some(4));
        assert_eq!(r.find(Some("static.example.com"), "/img/a.png"), Some(6));
    }

    #[test]
    fn no_route_when_nothing_matches() {
        let r = Router::new([(Some("a.com"), "/")]);
        assert_eq!(r.find(Some("b.com"), "/"), None);
        assert_eq!(r.find(None, "/"), None);
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("a.com:80"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.com"), "a.com");
    }
}
