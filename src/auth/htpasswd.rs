//! `auth.htpasswd`: HTTP Basic credentials checked against an htpasswd file of bcrypt entries
//! (`htpasswd -B`), as distribution does.
//!
//! - bcrypt runs on the blocking pool, a few at a time, never on an HTTP worker thread.
//! - An unknown user costs a bcrypt verification too (against a dummy hash of the file's
//!   highest cost), so response times don't tell which users exist.
//! - Clients send Basic credentials on every request: a successful verification is
//!   remembered for [`CACHE_TTL`] under a keyed SHA-256 of user and password (the key is
//!   random per process), so a push doesn't pay one bcrypt per request. Failures are never
//!   cached. Reloading the file clears the cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

/// How long a verified user:password pair is trusted without running bcrypt again.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// Most remembered pairs; the cache is cleared when full.
const CACHE_MAX: usize = 4096;

struct Users {
    /// user → bcrypt hash.
    hashes: HashMap<String, String>,
    /// Verified when the user is unknown, to spend the same time.
    dummy: String,
}

pub struct Htpasswd {
    path: PathBuf,
    users: RwLock<Arc<Users>>,
    cache: Mutex<HashMap<[u8; 32], Instant>>,
    cache_key: [u8; 32],
    /// Concurrent bcrypt verifications.
    slots: Semaphore,
}

impl Htpasswd {
    pub fn load(path: &Path) -> Result<Htpasswd, String> {
        let users = read_file(path)?;
        Ok(Htpasswd {
            path: path.to_path_buf(),
            users: RwLock::new(Arc::new(users)),
            cache: Mutex::new(HashMap::new()),
            cache_key: rand::random(),
            slots: Semaphore::new(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
            ),
        })
    }

    /// Reads the file again; on error the old users stay.
    pub fn reload(&self) -> Result<usize, String> {
        let users = read_file(&self.path)?;
        let n = users.hashes.len();
        *self.users.write().expect("users") = Arc::new(users);
        self.cache.lock().expect("cache").clear();
        Ok(n)
    }

    /// Whether `user` / `password` match an entry.
    pub async fn verify(&self, user: &str, password: &str) -> bool {
        let key = self.cache_key(user, password);
        {
            let mut cache = self.cache.lock().expect("cache");
            match cache.get(&key) {
                Some(at) if at.elapsed() < CACHE_TTL => return true,
                Some(_) => {
                    cache.remove(&key);
                }
                None => {}
            }
        }
        let users = self.users.read().expect("users").clone();
        let (known, hash) = match users.hashes.get(user) {
            Some(h) => (true, h.clone()),
            None => (false, users.dummy.clone()),
        };
        let Ok(_slot) = self.slots.acquire().await else {
            return false;
        };
        let password = password.to_string();
        let matched = tokio::task::spawn_blocking(move || {
            // bcrypt compares in constant time; errors (bad hash, password over 72 bytes)
            // are a mismatch.
            bcrypt::verify(password.as_bytes(), &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        let ok = matched && known;
        if ok {
            let mut cache = self.cache.lock().expect("cache");
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(key, Instant::now());
        }
        ok
    }

    fn cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update((user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }
}

fn read_file(path: &Path) -> Result<Users, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("auth.htpasswd.path {}: {e}", path.display()))?;
    let users = parse(&text).map_err(|e| format!("auth.htpasswd.path {}: {e}", path.display()))?;
    if users.is_empty() {
        log::warn!(
            "htpasswd file {} has no users: every login fails",
            path.display()
        );
    }
    let cost = users
        .values()
        .filter_map(|h| h.get(4..6).and_then(|c| c.parse::<u32>().ok()))
        .max()
        .unwrap_or(bcrypt::DEFAULT_COST)
        .clamp(4, 16);
    let dummy = bcrypt::hash("berth-dummy-password", cost).map_err(|e| e.to_string())?;
    Ok(Users {
        hashes: users,
        dummy,
    })
}

/// `user:hash` lines; blank lines and `#` comments are skipped. Only bcrypt hashes
/// (`$2y$`, `$2b$`, `$2a$`) are accepted, as in distribution.
pub fn parse(text: &str) -> Result<HashMap<String, String>, String> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: expected user:hash", i + 1))?;
        if user.is_empty() {
            return Err(format!("line {}: empty user name", i + 1));
        }
        let bcrypt = ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p))
            && hash.parse::<bcrypt::HashParts>().is_ok();
        if !bcrypt {
            return Err(format!(
                "line {}: user {user:?}: only bcrypt entries are supported (create them with `htpasswd -B`)",
                i + 1
            ));
        }
        users.insert(user.to_string(), hash.to_string());
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bcrypt_lines_only() {
        let h = bcrypt::hash("pw", 4).unwrap();
        let users = parse(&format!("# comment\n\nalice:{h}\n")).unwrap();
        assert_eq!(users.len(), 1);
        assert!(parse("bob:{SHA}abc=\n").unwrap_err().contains("bcrypt"));
        assert!(parse("bob:$apr1$x$y\n").unwrap_err().contains("bcrypt"));
        assert!(parse("justaname\n").is_err());
        assert!(parse(":$2y$05$abc\n").is_err());
        assert!(parse("bob:$2y$05$short\n").is_err());
    }

    #[tokio::test]
    async fn verifies_and_caches_successes_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        // htpasswd -B writes $2y$; the bcrypt crate writes $2b$: both must verify.
        let h = bcrypt::hash_with_result("secret", 4)
            .unwrap()
            .format_for_version(bcrypt::Version::TwoY);
        assert!(h.starts_with("$2y$04$"));
        std::fs::write(&path, format!("alice:{h}\n")).unwrap();
        let ht = Htpasswd::load(&path).unwrap();
        assert!(ht.verify("alice", "secret").await);
        assert!(ht.verify("alice", "secret").await); // cached
        assert!(!ht.verify("alice", "Secret").await);
        assert!(!ht.verify("bob", "secret").await);
        assert!(!ht.verify("alice", "").await);
        assert_eq!(ht.cache.lock().unwrap().len(), 1);

        // Reload: alice's password changes, the cache must not keep the old one alive.
        let h2 = bcrypt::hash("other", 4).unwrap();
        std::fs::write(&path, format!("alice:{h2}\n")).unwrap();
        assert_eq!(ht.reload().unwrap(), 1);
        assert!(!ht.verify("alice", "secret").await);
        assert!(ht.verify("alice", "other").await);
        // A broken file keeps the previous users.
        std::fs::write(&path, "alice:plain\n").unwrap();
        assert!(ht.reload().is_err());
        assert!(ht.verify("alice", "other").await);
    }
}
