//! TLS for both clients: rustls with the
//! `ring` crypto provider. `ring` builds in seconds where `aws-lc-rs`
//! (reqwest's default) compiles a C library for minutes, and the state
//! database's driver uses `ring` already, so the process carries one
//! provider.

/// A `reqwest` client builder, `ring` installed as the process's rustls
/// provider first: every HTTP client of the crate (and of its tests and
/// bench) starts here, because reqwest is built without a provider of its
/// own and would panic on `build()`.
pub fn client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
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
