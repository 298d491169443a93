//! Secret redaction: a leaf of the crate (it imports nothing from it), so
//! that every layer — the remote clients, the state database's error
//! texts, the commands' last lines — scrubs with the same rules.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

/// Removes secrets from any text before it can reach a log or an error.
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Vec<SecretString>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

/// What replaces a secret in redacted text.
pub const REDACTED: &str = "[REDACTED]";

impl Redactor {
    /// Secrets shorter than 4 characters are not scrubbed from free text
    /// (they would mangle ordinary words); they still never enter a URL we
    /// log, because no URL is ever logged.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 4).collect();
        // Longest first, so a secret containing another is removed whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor {
            secrets: secrets.into_iter().map(SecretString::from).collect(),
        }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            let s = secret.expose_secret();
            if out.contains(s) {
                out = out.replace(s, REDACTED);
            }
        }
        out
    }

    /// A short, single-line, redacted excerpt of a body for error messages.
    pub fn excerpt(&self, body: &[u8]) -> String {
        const MAX: usize = 160;
        let text = String::from_utf8_lossy(&body[..body.len().min(MAX * 4)]);
        // Redact before cutting, so a cut cannot leave half a secret.
        let collapsed = self.redact(&text.split_whitespace().collect::<Vec<_>>().join(" "));
        let mut short: String = collapsed.chars().take(MAX).collect();
        if collapsed.chars().count() > MAX {
            short.push('…');
        }
        short
    }
}
