//! Repository names, tags, digests and references, validated per the OCI distribution spec.

use std::fmt;

/// The digest algorithms berth verifies while bytes stream past (the OCI spec's registered
/// ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    fn prefix(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256:",
            Algorithm::Sha512 => "sha512:",
        }
    }

    /// Hex digits of an encoded digest.
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A content digest `algorithm:hex`, `sha256` or `sha512`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Option<Digest> {
        let algorithm = [Algorithm::Sha256, Algorithm::Sha512]
            .into_iter()
            .find(|a| s.starts_with(a.prefix()))?;
        let hex = &s[algorithm.prefix().len()..];
        let valid = hex.len() == algorithm.hex_len()
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        valid.then(|| Digest(s.to_string()))
    }

    /// The sha256 digest of bytes already in hand.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest::of(Algorithm::Sha256, bytes)
    }

    /// The digest of bytes already in hand (manifests).
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        use sha2::{Digest as _, Sha256, Sha512};
        match algorithm {
            Algorithm::Sha256 => Digest::from_raw(algorithm, &Sha256::digest(bytes)),
            Algorithm::Sha512 => Digest::from_raw(algorithm, &Sha512::digest(bytes)),
        }
    }

    pub fn from_raw(algorithm: Algorithm, raw: &[u8]) -> Digest {
        Digest(format!("{}{}", algorithm.prefix(), hex::encode(raw)))
    }

    pub fn algorithm(&self) -> Algorithm {
        if self.0.starts_with(Algorithm::Sha512.prefix()) {
            Algorithm::Sha512
        } else {
            Algorithm::Sha256
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part, without the algorithm (both prefixes are 7 bytes).
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a string looks like a digest at all (`alg:...`), as opposed to a tag. A reference
/// containing ':' cannot be a tag, so it must then parse as a digest or be DIGEST_INVALID.
pub fn looks_like_digest(s: &str) -> bool {
    s.contains(':')
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most 255 bytes
/// (distribution's limit on the whole name).
pub fn valid_repository(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.split('/').all(valid_path_component)
}

fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    // Separators between alphanumeric runs: '.', '_', '__', or one or more '-'.
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// What a manifest URL names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    /// None when the string is neither a valid tag nor a valid digest; the caller picks
    /// TAG_INVALID or DIGEST_INVALID with [`looks_like_digest`].
    pub fn parse(s: &str) -> Option<Reference> {
        if looks_like_digest(s) {
            Digest::parse(s).map(Reference::Digest)
        } else if valid_tag(s) {
            Some(Reference::Tag(s.to_string()))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names() {
        for ok in [
            "a",
            "library/ubuntu",
            "a/b/c/d",
            "my-app",
            "my--app",
            "my_app",
            "my__app",
            "my.app",
            "a0/b1.c2_d3-e4",
        ] {
            assert!(valid_repository(ok), "{ok}");
        }
        for bad in [
            "",
            "A",
            "UPPER/case",
            "-a",
            "a-",
            "a//b",
            "/a",
            "a/",
            "a___b",
            "a..b",
            "a._b",
            "a b",
            "a:b",
            &"a".repeat(256),
        ] {
            assert!(!valid_repository(bad), "{bad}");
        }
    }

    #[test]
    fn tags() {
        for ok in ["latest", "v1.0", "_x", "A-b.c_d", &"a".repeat(128)] {
            assert!(valid_tag(ok), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129), "ü"] {
            assert!(!valid_tag(bad), "{bad}");
        }
    }

    #[test]
    fn digests() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(Digest::parse(&good).unwrap().hex(), "ab".repeat(32));
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            format!("md5:{}", "ab".repeat(32)),
            format!("sha512:{}", "ab".repeat(32)),
            format!("sha512:{}", "AB".repeat(64)),
            format!("sha256:{}", "ab".repeat(64)),
            "ab".repeat(32),
        ] {
            assert!(Digest::parse(&bad).is_none(), "{bad}");
        }
        let long = format!("sha512:{}", "cd".repeat(64));
        let d = Digest::parse(&long).unwrap();
        assert_eq!(
            (d.algorithm(), d.hex()),
            (Algorithm::Sha512, &"cd".repeat(64)[..])
        );
        assert_eq!(
            Digest::of(Algorithm::Sha512, b"").as_str(),
            "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
        );
        assert_eq!(
            Digest::sha256_of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn references() {
        assert_eq!(
            Reference::parse("latest"),
            Some(Reference::Tag("latest".into()))
        );
        let d = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(Reference::parse(&d), Some(Reference::Digest(_))));
        assert_eq!(Reference::parse("sha256:zz"), None);
        assert_eq!(Reference::parse("-bad"), None);
    }
}
