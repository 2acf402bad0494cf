//! The console's sign-in sessions: in memory only (a restart signs everyone out), each with an
//! absolute expiry, the signed-in person's name (recorded in the audit log as who decided) and a
//! CSRF token checked on every state-changing form.
//!
//! Session ids and CSRF tokens are 256 bits from the operating system's CSPRNG (`getrandom`),
//! hex-encoded. The id travels only in the `HttpOnly`, `SameSite=Strict` cookie; the CSRF token
//! only in the forms' hidden field.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The cookie that carries the session id.
pub const COOKIE: &str = "tollgate_console";

/// How long a session lasts from sign-in.
pub const LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// Most sessions held at once; past it the one closest to expiry is dropped.
const MAX_SESSIONS: usize = 1024;

/// A signed-in person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The name given at sign-in, for the audit log.
    pub name: String,
    /// The token every state-changing form must carry.
    pub csrf: String,
    expires: Instant,
    /// A message for the next page shown (the outcome of the last action).
    flash: Option<String>,
}

/// Every open session, by id.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

/// 32 random bytes from the operating system's CSPRNG, as lowercase hex.
fn random_hex() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Sessions {
    /// Opens a session for `name`: its id and the session.
    pub fn create(&self, name: &str, now: Instant) -> Result<(String, Session), getrandom::Error> {
        let id = random_hex()?;
        let session = Session {
            name: name.to_string(),
            csrf: random_hex()?,
            expires: now + LIFETIME,
            flash: None,
        };
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(id.clone(), session.clone());
        Ok((id, session))
    }

    /// The live session with `id` (an expired one is forgotten).
    pub fn get(&self, id: &str, now: Instant) -> Option<Session> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(id) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// The message left for this page, once.
    pub fn take_flash(&self, id: &str) -> Option<String> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).get_mut(id)?.flash.take()
    }

    /// Leaves `message` for the session's next page.
    pub fn flash(&self, id: &str, message: String) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = map.get_mut(id) {
            s.flash = Some(message);
        }
    }

    /// Signs out.
    pub fn remove(&self, id: &str) {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
    }
}

/// The session id in the request's `Cookie` headers, if any.
pub fn cookie_id(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value that stores `id`: `HttpOnly` (no script reads it), `SameSite=Strict`
/// (no other site's page sends it), limited to `/console`, and `Secure` when the console is
/// reached over TLS.
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/console; Max-Age={}; HttpOnly; SameSite=Strict{}",
        LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that deletes the cookie.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/console; Max-Age=0; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_256_bit_hex_and_sessions_expire() {
        let sessions = Sessions::default();
        let t0 = Instant::now();
        let (a, sa) = sessions.create("alice", t0).unwrap();
        let (b, _) = sessions.create("bob", t0).unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_ne!(sa.csrf, a);
        assert_eq!(sessions.get(&a, t0).map(|s| s.name), Some("alice".into()));
        assert_eq!(sessions.get(&a, t0 + LIFETIME), None, "expired");
        assert_eq!(sessions.get(&a, t0), None, "and forgotten");
        sessions.remove(&b);
        assert_eq!(sessions.get(&b, t0), None, "signed out");
    }

    #[test]
    fn flash_messages_are_shown_once() {
        let sessions = Sessions::default();
        let t0 = Instant::now();
        let (id, _) = sessions.create("alice", t0).unwrap();
        sessions.flash(&id, "approved".into());
        assert_eq!(sessions.take_flash(&id).as_deref(), Some("approved"));
        assert_eq!(sessions.take_flash(&id), None);
        assert_eq!(sessions.take_flash("unknown"), None);
    }

    #[test]
    fn the_cookie_is_found_among_others_and_flagged() {
        let mut h = http::HeaderMap::new();
        h.append(http::header::COOKIE, "a=1; tollgate_console=abc; b=2".parse().unwrap());
        assert_eq!(cookie_id(&h).as_deref(), Some("abc"));
        assert_eq!(cookie_id(&http::HeaderMap::new()), None);
        let c = set_cookie("abc", false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        assert!(set_cookie("abc", true).ends_with("; Secure"));
        assert!(clear_cookie(false).contains("Max-Age=0"));
    }
}
