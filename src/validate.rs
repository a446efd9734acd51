//! Validation of everything a client sends, with the documented limits.
//!
//! Pure functions: input in, normalised value or a message out. Runs before any message
//! is sent to an actor, so a rejected request writes nothing. It must never panic on any
//! input; the property tests drive it with arbitrary strings.

/// Documented limits (docs/API.md lists them).
pub mod limits {
    pub const USERNAME: std::ops::RangeInclusive<usize> = 3..=32;
    pub const EMAIL_MAX: usize = 254;
    /// bcrypt reads only the first 72 bytes of a password: longer ones are refused.
    pub const PASSWORD_BYTES: std::ops::RangeInclusive<usize> = 8..=72;
    pub const NAME_MAX: usize = 100;
    pub const BIO_MAX: usize = 2000;
    pub const LIST_ITEMS_MAX: usize = 50;
    pub const LIST_ITEM_MAX: usize = 50;
    pub const PROJECT_NAME_MAX: usize = 200;
    pub const DESCRIPTION_MAX: usize = 10_000;
    pub const PAGE_DEFAULT: usize = 50;
    pub const PAGE_MAX: usize = 200;
    /// Largest request body accepted (bytes).
    pub const BODY_MAX: usize = 64 * 1024;
}

/// A validation failure, phrased for the client.
pub type Invalid = String;

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// A username: 3–32 of `A-Z a-z 0-9 _ . -`. Returned as given; uniqueness is
/// case-insensitive (see [`username_key`]).
pub fn username(s: &str) -> Result<String, Invalid> {
    if !limits::USERNAME.contains(&s.len()) || !s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return Err(format!(
            "username must be {}-{} characters from A-Z, a-z, 0-9, '_', '.', '-'",
            limits::USERNAME.start(),
            limits::USERNAME.end()
        ));
    }
    Ok(s.to_owned())
}

/// The key that makes usernames unique regardless of case.
pub fn username_key(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// An email address of the plain `local@domain.tld` shape, trimmed; at most 254 bytes.
pub fn email(s: &str) -> Result<String, Invalid> {
    let s = s.trim();
    let bad = || format!("email must look like name@example.org (at most {} characters)", limits::EMAIL_MAX);
    if s.len() > limits::EMAIL_MAX || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (local, domain) = s.rsplit_once('@').ok_or_else(bad)?;
    let domain_ok = domain.contains('.')
        && domain.split('.').all(|l| !l.is_empty() && l.chars().all(|c| c.is_alphanumeric() || c == '-'));
    if local.is_empty() || local.len() > 64 || local.contains('@') || !domain_ok {
        return Err(bad());
    }
    Ok(s.to_owned())
}

/// The key that makes emails unique: case-folded.
pub fn email_key(s: &str) -> String {
    s.trim().to_lowercase()
}

/// A password of 8–72 bytes (bcrypt ignores anything past 72).
pub fn password(s: &str) -> Result<(), Invalid> {
    if !limits::PASSWORD_BYTES.contains(&s.len()) {
        return Err(format!(
            "password must be {}-{} bytes long",
            limits::PASSWORD_BYTES.start(),
            limits::PASSWORD_BYTES.end()
        ));
    }
    Ok(())
}

/// A single-line text field: no control characters, at most `max` characters, trimmed.
pub fn line(field: &str, s: &str, min: usize, max: usize) -> Result<String, Invalid> {
    let s = s.trim();
    if s.chars().any(char::is_control) {
        return Err(format!("{field} must not contain control characters"));
    }
    let n = chars(s);
    if n < min || n > max {
        return Err(if min > 0 {
            format!("{field} must be {min}-{max} characters")
        } else {
            format!("{field} must be at most {max} characters")
        });
    }
    Ok(s.to_owned())
}

/// A multi-line text field: newlines and tabs allowed, other control characters not.
pub fn text(field: &str, s: &str, max: usize) -> Result<String, Invalid> {
    if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r') {
        return Err(format!("{field} must not contain control characters other than newlines and tabs"));
    }
    if chars(s) > max {
        return Err(format!("{field} must be at most {max} characters"));
    }
    Ok(s.to_owned())
}

/// A list of short labels (skills, interests, tags): at most 50 items of 1–50
/// characters each; items are trimmed and exact duplicates dropped, order kept.
pub fn labels(field: &str, items: &[String]) -> Result<Vec<String>, Invalid> {
    if items.len() > limits::LIST_ITEMS_MAX {
        return Err(format!("{field} may hold at most {} items", limits::LIST_ITEMS_MAX));
    }
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let item = line(field, item, 1, limits::LIST_ITEM_MAX).map_err(|_| {
            format!("each of {field} must be 1-{} characters without control characters", limits::LIST_ITEM_MAX)
        })?;
        if !out.contains(&item) {
            out.push(item);
        }
    }
    Ok(out)
}

/// A page size: default 50, 1–200.
pub fn page_limit(limit: Option<usize>) -> Result<usize, Invalid> {
    match limit {
        None => Ok(limits::PAGE_DEFAULT),
        Some(n) if (1..=limits::PAGE_MAX).contains(&n) => Ok(n),
        Some(_) => Err(format!("limit must be 1-{}", limits::PAGE_MAX)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn usernames() {
        assert!(username("ada_l.ove-1").is_ok());
        for bad in ["ab", "a b c", "ünïcode", "x'; DROP TABLE users;--", &"a".repeat(33), ""] {
            assert!(username(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(username_key("Ada"), "ada");
    }

    #[test]
    fn emails() {
        assert_eq!(email("  ada@example.org ").unwrap(), "ada@example.org");
        for bad in [
            "ada",
            "ada@",
            "@example.org",
            "ada@example",
            "a da@example.org",
            "ada@exa..mple.org",
            "ada@exa\nmple.org",
            "ad\u{0}a@example.org",
        ] {
            assert!(email(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(email_key("Ada@Example.ORG"), "ada@example.org");
    }

    #[test]
    fn passwords_are_bounded_in_bytes() {
        assert!(password("1234567").is_err());
        assert!(password("12345678").is_ok());
        assert!(password(&"x".repeat(72)).is_ok());
        assert!(password(&"x".repeat(73)).is_err());
        // 24 three-byte characters are 72 bytes: still fine; one more is not.
        assert!(password(&"€".repeat(24)).is_ok());
        assert!(password(&"€".repeat(25)).is_err());
    }

    #[test]
    fn lines_and_labels() {
        assert_eq!(line("name", "  Ada  ", 1, 10).unwrap(), "Ada");
        assert!(line("name", "a\u{0}b", 0, 10).is_err());
        assert!(line("name", "", 1, 10).is_err());
        assert!(text("bio", "two\nlines", 20).is_ok());
        assert!(text("bio", "bell\u{7}", 20).is_err());
        let l = labels("skills", &["rust".into(), " rust ".into(), "sql".into()]).unwrap();
        assert_eq!(l, vec!["rust", "sql"]);
        assert!(labels("skills", &vec!["x".to_string(); 51]).is_err());
        assert!(labels("skills", &["".into()]).is_err());
    }

    proptest! {
        #[test]
        fn never_panics(s in ".*", items in prop::collection::vec(".*", 0..60)) {
            let _ = username(&s);
            let _ = email(&s);
            let _ = password(&s);
            let _ = line("f", &s, 0, 100);
            let _ = text("f", &s, 100);
            let _ = labels("f", &items);
        }

        #[test]
        fn accepted_values_respect_limits(s in ".*") {
            if let Ok(v) = line("f", &s, 1, 20) {
                prop_assert!((1..=20).contains(&v.chars().count()));
                prop_assert!(!v.chars().any(char::is_control));
            }
            if let Ok(v) = email(&s) {
                prop_assert!(v.len() <= limits::EMAIL_MAX && v.contains('@'));
            }
        }
    }
}
