//! Bounded identifiers and text.
//!
//! Everything a peer names — devices, resources, labels — has a fixed upper size and a
//! restricted alphabet, checked on construction *and* on decoding, so that a peer can
//! neither make the other side allocate without bound nor smuggle separators, control
//! characters or path syntax into places that later become file names or SQL keys.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string was not accepted as a bounded identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes long, the limit is {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} {value:?} contains {bad:?}; allowed are {allowed}")]
    BadChar {
        what: &'static str,
        value: String,
        bad: char,
        allowed: &'static str,
    },
}

macro_rules! bounded_id {
    ($(#[$doc:meta])* $name:ident, $max:literal, $inner:literal, $what:expr, $allowed_desc:expr, $allowed:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = $inner, into = $inner)]
        pub struct $name(heapless::String<{ $max }>);

        impl $name {
            /// Largest length in bytes.
            pub const MAX_LEN: usize = $max;

            /// Checks and wraps `s`.
            pub fn new(s: &str) -> Result<Self, BoundError> {
                if s.is_empty() {
                    return Err(BoundError::Empty { what: $what });
                }
                if s.len() > $max {
                    return Err(BoundError::TooLong { what: $what, len: s.len(), max: $max });
                }
                let allowed: fn(char) -> bool = $allowed;
                if let Some(bad) = s.chars().find(|c| !allowed(*c)) {
                    return Err(BoundError::BadChar {
                        what: $what,
                        value: s.to_string(),
                        bad,
                        allowed: $allowed_desc,
                    });
                }
                let mut inner = heapless::String::new();
                // Length was checked above, so this cannot fail; map it anyway rather than panic.
                inner
                    .push_str(s)
                    .map_err(|()| BoundError::TooLong { what: $what, len: s.len(), max: $max })?;
                Ok(Self(inner))
            }

            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl TryFrom<heapless::String<{ $max }>> for $name {
            type Error = BoundError;
            fn try_from(s: heapless::String<{ $max }>) -> Result<Self, BoundError> {
                Self::new(s.as_str())
            }
        }

        impl From<$name> for heapless::String<{ $max }> {
            fn from(v: $name) -> Self {
                v.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = BoundError;
            fn from_str(s: &str) -> Result<Self, BoundError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self.as_str(), f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    };
}

type Str64 = heapless::String<64>;
type Str63 = heapless::String<63>;

fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn label_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

bounded_id!(
    /// A device's identity as the hub assigned it at enrollment.
    DeviceId, 64, "Str64", "device id", "ASCII letters, digits, '-', '_' and '.'", id_char
);
bounded_id!(
    /// The name of one resource in a desired-state document, e.g. `motd`.
    ResourceName, 64, "Str64", "resource name", "ASCII letters, digits, '-', '_' and '.'", id_char
);
bounded_id!(
    /// A label key such as `site` or `example.com/role`.
    LabelKey, 63, "Str63", "label key", "ASCII letters, digits, '-', '_', '.' and '/'", label_key_char
);
bounded_id!(
    /// A label value such as `paris`.
    LabelValue, 63, "Str63", "label value", "ASCII letters, digits, '-', '_' and '.'", id_char
);

/// Free text with an upper bound in bytes (messages, versions, reasons).
///
/// Unlike the identifiers it may hold any UTF-8, but no more than `N` bytes; decoding a
/// longer one fails.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub struct Text<const N: usize>(String);

impl<const N: usize> Text<N> {
    /// Checks and wraps `s`.
    pub fn new(s: impl Into<String>) -> Result<Self, BoundError> {
        let s = s.into();
        if s.len() > N {
            return Err(BoundError::TooLong {
                what: "text",
                len: s.len(),
                max: N,
            });
        }
        Ok(Self(s))
    }

    /// Wraps `s`, cutting it at a character boundary if it is longer than `N` bytes.
    /// For messages built locally, where losing the tail beats losing the message.
    pub fn truncated(s: &str) -> Self {
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        Self(s[..end].to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const N: usize> TryFrom<String> for Text<N> {
    type Error = BoundError;
    fn try_from(s: String) -> Result<Self, BoundError> {
        Self::new(s)
    }
}

impl<const N: usize> From<Text<N>> for String {
    fn from(t: Text<N>) -> String {
        t.0
    }
}

impl<const N: usize> fmt::Display for Text<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<const N: usize> fmt::Debug for Text<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_what_they_should() {
        assert!(DeviceId::new("dev-1a2b.c_d").is_ok());
        assert_eq!(
            DeviceId::new(""),
            Err(BoundError::Empty { what: "device id" })
        );
        assert!(matches!(
            DeviceId::new(&"x".repeat(65)),
            Err(BoundError::TooLong { max: 64, .. })
        ));
        assert!(matches!(
            ResourceName::new("../etc"),
            Err(BoundError::BadChar { bad: '/', .. })
        ));
        assert!(LabelKey::new("example.com/role").is_ok());
        assert!(LabelValue::new("a b").is_err());
    }

    #[test]
    fn decoding_enforces_the_bound() {
        let long = "y".repeat(64);
        let bytes = postcard::to_allocvec(&long).unwrap();
        assert!(postcard::from_bytes::<LabelValue>(&bytes).is_err());
        let bad = postcard::to_allocvec("a/b").unwrap();
        assert!(postcard::from_bytes::<DeviceId>(&bad).is_err());
        let ok = postcard::to_allocvec("a.b").unwrap();
        assert_eq!(
            postcard::from_bytes::<DeviceId>(&ok).unwrap().as_str(),
            "a.b"
        );
    }

    #[test]
    fn text_truncates_on_char_boundary() {
        let t = Text::<4>::truncated("aéé");
        assert_eq!(t.as_str(), "aé");
        assert!(Text::<4>::new("aéé").is_err());
    }
}
