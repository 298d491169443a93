//! The HTTP clients: one per timeout, shared by every caller of the
//! process ([`Clients`]), all on rustls with the
//! `ring` crypto provider. `ring` builds in seconds where `aws-lc-rs`
//! (reqwest's default) compiles a C library for minutes, and the state
//! database's driver uses `ring` already, so the process carries one
//! provider.

use std::time::Duration;

/// A `reqwest` client builder, `ring` installed as the process's rustls
/// provider first: every HTTP client of the crate (and of its tests and
/// bench) starts here, because reqwest is built without a provider of its
/// own and would panic on `build()`.
pub fn client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
}

/// The clients the callers of this process share, one per timeout.
///
/// A `reqwest::Client` carries its own TLS configuration and connection
/// pool, about 100 KB: one per caller made a thousand tenants carry two
/// thousand of them. Callers with the same timeout (every tenant, unless
/// its file sets another) share one; its pool keeps connections per host,
/// so tenants on one CRM or EDM host reuse each other's idle connections,
/// and each caller's own limits (requests in flight, rate) still apply.
#[derive(Default)]
pub(crate) struct Clients {
    by_timeout: std::sync::Mutex<std::collections::HashMap<Duration, reqwest::Client>>,
}

impl Clients {
    /// The process's clients.
    pub(crate) fn shared() -> &'static Clients {
        static SHARED: std::sync::LazyLock<Clients> = std::sync::LazyLock::new(Clients::default);
        &SHARED
    }

    /// The client whose requests give up after `timeout`, built the
    /// first time it is asked for.
    pub(crate) fn with_timeout(&self, timeout: Duration) -> reqwest::Result<reqwest::Client> {
        let mut clients = self
            .by_timeout
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = clients.get(&timeout) {
            return Ok(client.clone());
        }
        let client = client_builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(64)
            .user_agent(crate::instance::default_user_agent())
            .build()?;
        clients.insert(timeout, client.clone());
        Ok(client)
    }

    /// How many clients there are.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_timeout
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// Makes `ring` the process's rustls provider, once.
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err only when a provider is installed already: that one stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_with_the_same_timeout_share_one_client() {
        // Arrange
        let clients = Clients::default();

        // Act: a thousand tenants' callers, two timeouts among them.
        for i in 0..1000 {
            let secs = if i % 10 == 0 { 60 } else { 30 };
            clients.with_timeout(Duration::from_secs(secs)).unwrap();
        }

        // Assert
        assert_eq!(clients.len(), 2);
    }

    #[test]
    fn a_client_builds_with_ring_as_the_process_provider() {
        let client = client_builder().build();

        assert!(client.is_ok(), "{client:?}");
        let provider = rustls::crypto::CryptoProvider::get_default().expect("installed");
        let ring = rustls::crypto::ring::default_provider();
        assert_eq!(
            provider.cipher_suites.len(),
            ring.cipher_suites.len(),
            "the installed provider is ring's"
        );
    }
}
