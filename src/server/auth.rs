//! HTTP Basic authentication against argon2id password hashes.
//!
//! Credentials come from a file of `user:$argon2id$…` lines or, for development, from one
//! `user:password` pair (hashed at start, so both take the same path). argon2 is deliberately
//! slow, so a header that verified once is remembered by its SHA-256 digest: argon2 runs once
//! per distinct header, not per request. Failures are never cached and never logged with the
//! password.

use super::error::ApiError;
use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use base64::Engine;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Most verified headers remembered at once; the cache is cleared when it fills.
const CACHE_CAPACITY: usize = 4096;
/// argon2 verifications running at once (19 MiB and ~20 ms of one core each).
pub const MAX_CONCURRENT_VERIFICATIONS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read credentials file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("credentials file {path}, line {line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("FMNIST_BASIC_AUTH must be 'user:password' with a non-empty user and password")]
    BadDevPair,
    #[error(
        "no credentials configured: pass --credentials-file (lines 'user:$argon2id$...', made \
         with 'fmnist-serve hash-password USER') or set FMNIST_BASIC_AUTH=user:password for development"
    )]
    None,
    #[error("could not hash the development password: {0}")]
    Hash(String),
}

/// Hashes a password with argon2id and a random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, AuthConfigError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthConfigError::Hash(e.to_string()))
}

#[derive(Debug)]
pub struct Authenticator {
    users: HashMap<String, String>,
    /// Hash checked when the user is unknown, so unknown users cost as much as wrong passwords.
    decoy: String,
    verified: Mutex<HashMap<[u8; 32], String>>,
    /// Bounds concurrent argon2 runs (memory and CPU under a burst or a guessing attack).
    hashing: tokio::sync::Semaphore,
}

/// A warning when the credentials file can be read by every user on the machine (the
/// hashes would then be open to offline guessing). Not fatal: Kubernetes mounts Secrets
/// 0644 unless told otherwise.
pub fn permission_warning(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o004 != 0 {
            return Some(format!(
                "credentials file {} is readable by every user (mode {:o}); restrict it, e.g. chmod 600",
                path.display(),
                mode & 0o777
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    None
}

pub(crate) fn parse_file(
    path: &Path,
    text: &str,
) -> Result<HashMap<String, String>, AuthConfigError> {
    let mut users = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fail = |message: String| AuthConfigError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let Some((user, hash)) = line.split_once(':') else {
            return Err(fail("expected 'user:$argon2id$...'".into()));
        };
        if user.is_empty() {
            return Err(fail("empty user name".into()));
        }
        let parsed =
            PasswordHash::new(hash).map_err(|e| fail(format!("not a PHC password hash ({e})")))?;
        if parsed.algorithm.as_str() != "argon2id" {
            return Err(fail(format!(
                "hash algorithm is {}, expected argon2id",
                parsed.algorithm
            )));
        }
        if parsed.salt.is_none() || parsed.hash.is_none() {
            return Err(fail(
                "the hash has no salt or no digest (make lines with `fmnist-serve hash-password`)"
                    .into(),
            ));
        }
        if users.insert(user.to_string(), hash.to_string()).is_some() {
            return Err(fail(format!("user '{user}' appears twice")));
        }
    }
    Ok(users)
}

/// The user and password of a `Basic` authorization header, or `None` if malformed.
pub(crate) fn decode_basic(header: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(header).ok()?;
    let (scheme, rest) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let pair = String::from_utf8(bytes).ok()?;
    let (user, password) = pair.split_once(':')?;
    if user.is_empty() {
        return None;
    }
    Some((user.to_string(), password.to_string()))
}

impl Authenticator {
    /// Builds the user table from a credentials file and/or a development `user:password`.
    pub fn from_sources(
        file: Option<&Path>,
        dev_pair: Option<&str>,
    ) -> Result<Self, AuthConfigError> {
        let mut users = HashMap::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| AuthConfigError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            users = parse_file(path, &text)?;
        }
        if let Some(pair) = dev_pair {
            let (user, password) = pair.split_once(':').ok_or(AuthConfigError::BadDevPair)?;
            if user.is_empty() || password.is_empty() {
                return Err(AuthConfigError::BadDevPair);
            }
            users.insert(user.to_string(), hash_password(password)?);
        }
        if users.is_empty() {
            return Err(AuthConfigError::None);
        }
        Ok(Self {
            users,
            decoy: hash_password("decoy password that no header carries")?,
            verified: Mutex::new(HashMap::new()),
            hashing: tokio::sync::Semaphore::new(MAX_CONCURRENT_VERIFICATIONS),
        })
    }

    /// Number of configured users.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Checks an `Authorization` header; returns the user name. argon2 runs on a blocking
    /// thread so the reactor keeps serving, at most [`MAX_CONCURRENT_VERIFICATIONS`] at once:
    /// each takes 19 MiB, and 64 clients arriving together with the same new header once
    /// drove the server to 1.4 GB. Waiters re-check the cache, so that burst costs one hash.
    pub async fn check(self: &Arc<Self>, header: Option<&[u8]>) -> Result<String, ApiError> {
        let header = header.ok_or(ApiError::Unauthorized)?;
        let digest: [u8; 32] = Sha256::digest(header).into();
        if let Some(user) = self.cached(&digest) {
            return Ok(user);
        }
        let (user, password) = decode_basic(header).ok_or(ApiError::Unauthorized)?;
        let _permit = self
            .hashing
            .acquire()
            .await
            .map_err(|e| ApiError::Internal(format!("auth semaphore closed: {e}")))?;
        if let Some(user) = self.cached(&digest) {
            return Ok(user);
        }
        let this = Arc::clone(self);
        let ok = tokio::task::spawn_blocking(move || this.verify(&user, &password).then_some(user))
            .await
            .map_err(|e| ApiError::Internal(format!("auth task failed: {e}")))?;
        let user = ok.ok_or(ApiError::Unauthorized)?;
        let mut cache = self.verified.lock().expect("auth cache lock");
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(digest, user.clone());
        Ok(user)
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<String> {
        self.verified
            .lock()
            .expect("auth cache lock")
            .get(digest)
            .cloned()
    }

    fn verify(&self, user: &str, password: &str) -> bool {
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.as_str(), true),
            None => (self.decoy.as_str(), false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        // argon2's verifier compares the digests in constant time.
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        ok && known
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn header(user: &str, pw: &str) -> Vec<u8> {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        format!("Basic {b}").into_bytes()
    }

    #[tokio::test]
    async fn accepts_right_and_rejects_wrong_credentials() {
        let auth = Arc::new(Authenticator::from_sources(None, Some("alice:s3cret")).unwrap());
        assert_eq!(
            auth.check(Some(&header("alice", "s3cret"))).await.unwrap(),
            "alice"
        );
        // Cached now; still right.
        assert_eq!(
            auth.check(Some(&header("alice", "s3cret"))).await.unwrap(),
            "alice"
        );
        for bad in [
            header("alice", "wrong"),
            header("bob", "s3cret"),
            header("", "s3cret"),
            b"Basic !!!notbase64".to_vec(),
            b"Bearer abc".to_vec(),
            b"Basic".to_vec(),
            vec![0xff, 0xfe],
        ] {
            assert!(auth.check(Some(&bad)).await.is_err(), "{bad:?} accepted");
        }
        assert!(auth.check(None).await.is_err());
    }

    #[test]
    fn credentials_file_lines_are_checked() {
        let hash = hash_password("pw").unwrap();
        let p = Path::new("creds");
        let users = parse_file(p, &format!("# comment\n\nalice:{hash}\n")).unwrap();
        assert!(users.contains_key("alice"));
        let err = parse_file(p, "alice:plaintext\n").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("not a PHC"), "{err}");
        let err = parse_file(p, &format!("a:{hash}\nnocolon\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        let err = parse_file(p, &format!("a:{hash}\na:{hash}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("twice"), "{err}");
        // A PHC string without salt and digest parses but could never verify anything.
        let err = parse_file(p, "a:$argon2id$broken\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no salt or no digest"), "{err}");
    }

    #[test]
    fn refuses_to_run_without_credentials() {
        assert!(matches!(
            Authenticator::from_sources(None, None),
            Err(AuthConfigError::None)
        ));
        assert!(Authenticator::from_sources(None, Some("nopassword")).is_err());
        assert!(Authenticator::from_sources(None, Some(":pw")).is_err());
    }
}
