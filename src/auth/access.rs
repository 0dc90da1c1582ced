//! What each request needs, and what a caller is granted.
//!
//! Requirements follow distribution: reads (GET/HEAD) need `pull`; writes (PUT/POST/PATCH)
//! need `pull` and `push`; deletes of manifests and blobs need `delete`; the catalog needs
//! `registry:catalog:*`; `/v2/` needs any valid credentials. Two deliberate differences:
//! every request on an upload session (status, chunks, finish, cancel) needs `pull,push`,
//! since a session is part of a push and deletes nothing stored; and a cross-repository
//! mount needs `pull` on the source as well (without it the mount falls back to a new
//! upload session, as in distribution).

use crate::http::endpoint::{Endpoint, Mount};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }
}

const PULL: &[Action] = &[Action::Pull];
const PULL_PUSH: &[Action] = &[Action::Pull, Action::Push];
const DELETE: &[Action] = &[Action::Delete];

/// The access one request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need<'a> {
    /// Open to everyone (the `/` banner).
    Nothing,
    /// Any valid credentials (`/v2/`, the clients' authentication probe).
    Authenticated,
    /// `registry:catalog:*`.
    Catalog,
    /// All of `actions` on repository `name`.
    Repository {
        name: &'a str,
        actions: &'static [Action],
    },
}

/// What `ep` needs. A mount's source is checked separately ([`mount_source`]).
pub fn need(ep: &Endpoint) -> Need<'_> {
    use Endpoint::*;
    match ep {
        Banner => Need::Nothing,
        ApiBase => Need::Authenticated,
        Catalog(_) => Need::Catalog,
        TagsList { name, .. }
        | GetManifest { name, .. }
        | GetBlob { name, .. }
        | Referrers { name, .. } => Need::Repository {
            name,
            actions: PULL,
        },
        PutManifest { name, .. }
        | StartUpload { name, .. }
        | UploadStatus { name, .. }
        | PatchUpload { name, .. }
        | FinishUpload { name, .. }
        | CancelUpload { name, .. } => Need::Repository {
            name,
            actions: PULL_PUSH,
        },
        DeleteManifest { name, .. } | DeleteBlob { name, .. } => Need::Repository {
            name,
            actions: DELETE,
        },
    }
}

/// The source repository of a cross-repository mount, which needs `pull`.
pub fn mount_source(ep: &Endpoint) -> Option<&str> {
    match ep {
        Endpoint::StartUpload {
            mount: Some(Mount {
                from: Some(from), ..
            }),
            ..
        } => Some(from),
        _ => None,
    }
}

/// Forgets a mount's source: the request becomes a plain upload session.
pub fn drop_mount_source(ep: &mut Endpoint) {
    if let Endpoint::StartUpload { mount: Some(m), .. } = ep {
        m.from = None;
    }
}

/// The Docker token scope that grants `need` (`repository:NAME:pull,push`), if any.
pub fn scope(need: &Need) -> Option<String> {
    match need {
        Need::Nothing | Need::Authenticated => None,
        Need::Catalog => Some("registry:catalog:*".into()),
        Need::Repository { name, actions } => Some(format!(
            "repository:{name}:{}",
            actions
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(",")
        )),
    }
}

/// One entry of a token's `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Grant {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub actions: Vec<String>,
}

impl Grant {
    fn allows(&self, kind: &str, name: &str, action: &str) -> bool {
        self.kind == kind
            && self.name == name
            && self.actions.iter().any(|a| a == action || a == "*")
    }
}

/// Who is asking, once credentials are verified.
#[derive(Debug, Clone)]
pub enum Principal {
    /// No credentials: only anonymous pulls of matching repositories.
    Anonymous,
    /// An htpasswd user: every access (htpasswd has no per-repository rules).
    User(String),
    /// A bearer token: exactly what its `access` claim grants.
    Token { subject: String, grants: Vec<Grant> },
}

impl Principal {
    pub fn is_anonymous(&self) -> bool {
        matches!(self, Principal::Anonymous)
    }

    /// Whether this principal may do `action` on repository `name`; `anonymous` says which
    /// repositories anyone may pull.
    pub fn may(&self, name: &str, action: Action, anonymous: &AnonymousPull) -> bool {
        match self {
            Principal::User(_) => true,
            Principal::Anonymous => action == Action::Pull && anonymous.matches(name),
            Principal::Token { grants, .. } => {
                grants
                    .iter()
                    .any(|g| g.allows("repository", name, action.as_str()))
                    // A public repository stays public for callers with a token, too.
                    || (action == Action::Pull && anonymous.matches(name))
            }
        }
    }

    pub fn may_list_catalog(&self) -> bool {
        match self {
            Principal::User(_) => true,
            Principal::Anonymous => false,
            Principal::Token { grants, .. } => {
                grants.iter().any(|g| g.allows("registry", "catalog", "*"))
            }
        }
    }

    /// Whether this principal has everything `need` asks for.
    pub fn satisfies(&self, need: &Need, anonymous: &AnonymousPull) -> bool {
        match need {
            Need::Nothing => true,
            Need::Authenticated => !self.is_anonymous(),
            Need::Catalog => self.may_list_catalog(),
            Need::Repository { name, actions } => {
                actions.iter().all(|a| self.may(name, *a, anonymous))
            }
        }
    }
}

/// `auth.anonymous_pull`: repository patterns anyone may pull. `*` matches any run of
/// characters, `/` included (`public/*` matches `public/a` and `public/a/b`).
#[derive(Debug, Clone, Default)]
pub struct AnonymousPull {
    patterns: Vec<String>,
}

impl AnonymousPull {
    pub fn new(patterns: &[String]) -> Self {
        AnonymousPull {
            patterns: patterns.to_vec(),
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| glob(p.as_bytes(), name.as_bytes()))
    }
}

/// `*`-only glob, iterative (no backtracking blow-up on long names).
pub(crate) fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::endpoint::Endpoint;
    use http::Method;

    fn ep(m: Method, path: &str, q: Option<&str>) -> Endpoint {
        Endpoint::parse(&m, path, q).unwrap()
    }

    fn d() -> String {
        format!("sha256:{}", "a".repeat(64))
    }

    #[test]
    fn every_route_has_its_requirement() {
        let cases: Vec<(Endpoint, Option<&str>)> = vec![
            (ep(Method::GET, "/", None), None),
            (ep(Method::GET, "/v2/", None), None),
            (
                ep(Method::GET, "/v2/_catalog", None),
                Some("registry:catalog:*"),
            ),
            (
                ep(Method::GET, "/v2/a/b/tags/list", None),
                Some("repository:a/b:pull"),
            ),
            (
                ep(Method::HEAD, "/v2/a/manifests/latest", None),
                Some("repository:a:pull"),
            ),
            (
                ep(Method::PUT, "/v2/a/manifests/latest", None),
                Some("repository:a:pull,push"),
            ),
            (
                ep(Method::DELETE, "/v2/a/manifests/latest", None),
                Some("repository:a:delete"),
            ),
            (
                ep(Method::GET, &format!("/v2/a/blobs/{}", d()), None),
                Some("repository:a:pull"),
            ),
            (
                ep(Method::DELETE, &format!("/v2/a/blobs/{}", d()), None),
                Some("repository:a:delete"),
            ),
            (
                ep(Method::POST, "/v2/a/blobs/uploads/", None),
                Some("repository:a:pull,push"),
            ),
            (
                ep(Method::GET, "/v2/a/blobs/uploads/x", None),
                Some("repository:a:pull,push"),
            ),
            (
                ep(Method::PATCH, "/v2/a/blobs/uploads/x", None),
                Some("repository:a:pull,push"),
            ),
            (
                ep(
                    Method::PUT,
                    "/v2/a/blobs/uploads/x",
                    Some(&format!("digest={}", d())),
                ),
                Some("repository:a:pull,push"),
            ),
            (
                ep(Method::DELETE, "/v2/a/blobs/uploads/x", None),
                Some("repository:a:pull,push"),
            ),
            (
                ep(Method::GET, &format!("/v2/a/referrers/{}", d()), None),
                Some("repository:a:pull"),
            ),
        ];
        for (e, want) in cases {
            assert_eq!(scope(&need(&e)).as_deref(), want, "{e:?}");
        }
        assert_eq!(need(&ep(Method::GET, "/", None)), Need::Nothing);
        assert_eq!(need(&ep(Method::GET, "/v2/", None)), Need::Authenticated);
    }

    #[test]
    fn mount_source_needs_pull_or_is_dropped() {
        let q = format!("mount={}&from=src/repo", d());
        let mut e = ep(Method::POST, "/v2/dst/blobs/uploads/", Some(&q));
        assert_eq!(mount_source(&e), Some("src/repo"));
        drop_mount_source(&mut e);
        assert_eq!(mount_source(&e), None);
        assert!(matches!(
            e,
            Endpoint::StartUpload {
                mount: Some(Mount { from: None, .. }),
                ..
            }
        ));
    }

    #[test]
    fn grants() {
        let anon = AnonymousPull::new(&["public/*".into(), "lib".into()]);
        let token = Principal::Token {
            subject: "u".into(),
            grants: vec![
                Grant {
                    kind: "repository".into(),
                    name: "a".into(),
                    actions: vec!["pull".into()],
                },
                Grant {
                    kind: "repository".into(),
                    name: "b".into(),
                    actions: vec!["*".into()],
                },
            ],
        };
        let pull = |n| Need::Repository {
            name: n,
            actions: PULL,
        };
        let push = |n| Need::Repository {
            name: n,
            actions: PULL_PUSH,
        };
        assert!(token.satisfies(&pull("a"), &anon));
        assert!(!token.satisfies(&push("a"), &anon));
        assert!(token.satisfies(&push("b"), &anon));
        assert!(!token.satisfies(&pull("c"), &anon));
        assert!(token.satisfies(&pull("public/x"), &anon));
        assert!(!token.satisfies(&Need::Catalog, &anon));
        assert!(token.satisfies(&Need::Authenticated, &anon));

        let a = Principal::Anonymous;
        assert!(a.satisfies(&pull("public/x/y"), &anon));
        assert!(a.satisfies(&pull("lib"), &anon));
        assert!(!a.satisfies(&pull("library"), &anon));
        assert!(!a.satisfies(&pull("publicx"), &anon));
        assert!(!a.satisfies(&push("public/x"), &anon));
        assert!(!a.satisfies(&Need::Authenticated, &anon));
        assert!(!a.satisfies(&Need::Catalog, &anon));

        let u = Principal::User("u".into());
        assert!(u.satisfies(&push("anything"), &anon));
        assert!(u.satisfies(&Need::Catalog, &anon));
    }

    #[test]
    fn globs() {
        assert!(glob(b"*", b"a/b"));
        assert!(glob(b"a*c", b"abbbc"));
        assert!(glob(b"a/*/c", b"a/b/c"));
        assert!(!glob(b"a/*/c", b"a/b/d"));
        assert!(glob(b"a**", b"a"));
        assert!(!glob(b"", b"a"));
        // Many stars against a long name: linear-ish, no exponential backtracking.
        assert!(glob(&b"*a".repeat(30), &b"a".repeat(255)));
        assert!(!glob(
            &b"*a".repeat(30),
            &[b"a".repeat(254), b"b".to_vec()].concat()
        ));
    }
}
