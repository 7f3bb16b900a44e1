//! Ingress over TLS with a test certificate: ALPN offers h2 and http/1.1.

mod common;

use std::sync::Arc;

use common::*;
use http::{StatusCode, Version};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

struct Tls {
    relay: TestRelay,
    roots: rustls::RootCertStore,
    /// Holds the certificate files as long as the relay runs.
    certs: tempfile::TempDir,
}

/// A new self-signed certificate for localhost, written where the relay's
/// config points; the roots that trust it.
fn write_cert(dir: &std::path::Path) -> rustls::RootCertStore {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("relay.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("relay.key"), cert.key_pair.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    roots
}

async fn start_tls() -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let roots = write_cert(dir.path());
    let tls = format!(
        "  tls:\n    cert: \"{}\"\n    key: \"{}\"",
        dir.path().join("relay.pem").display(),
        dir.path().join("relay.key").display()
    );
    let relay = start_with(&tls, "").await;
    Tls { relay, roots, certs: dir }
}

fn client(
    roots: &rustls::RootCertStore,
    alpn: &[&[u8]],
    version: &'static rustls::SupportedProtocolVersion,
) -> tokio_rustls::TlsConnector {
    let mut config = rustls::ClientConfig::builder_with_provider(hookrelay::ingress::tls::provider())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn post_tls(t: &Tls, alpn: &[&[u8]], version: &'static rustls::SupportedProtocolVersion) -> Reply {
    let tcp = TcpStream::connect(t.relay.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let stream = client(&t.roots, alpn, version).connect(name, tcp).await.unwrap();
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let req =
        request("/hooks/buttercms", &[("x-webhook-secret", BUTTER_SECRET)], fixture("buttercms-page-published.json"));
    send_on(TokioIo::new(stream), req, h2).await
}

#[tokio::test]
async fn https_with_http2_negotiated_by_alpn() {
    let t = start_tls().await;
    let reply = post_tls(&t, &[b"h2", b"http/1.1"], &rustls::version::TLS13).await;
    assert_eq!(reply.version, Version::HTTP_2);
    assert_eq!(reply.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn https_with_http1_over_tls12() {
    let t = start_tls().await;
    let reply = post_tls(&t, &[b"http/1.1"], &rustls::version::TLS12).await;
    assert_eq!(reply.version, Version::HTTP_11);
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert!(t.relay.store.event(reply.json()["id"].as_str().unwrap().parse().unwrap()).await.unwrap().is_some());
}

/// A reload reads the certificate and key again: a renewed certificate
/// (cert-manager, certbot) is served to new connections without a restart.
#[tokio::test]
async fn a_reload_serves_a_renewed_certificate() {
    let mut t = start_tls().await;
    assert_eq!(post_tls(&t, &[b"http/1.1"], &rustls::version::TLS13).await.status, StatusCode::ACCEPTED);
    let old = std::mem::replace(&mut t.roots, write_cert(t.certs.path()));
    let settings = hookrelay::config::load(&t.relay.dir.path().join("routes.yaml")).unwrap();
    t.relay.relay.reload(settings).await.unwrap();
    // The same webhook again: its duplicate's answer, over the new certificate.
    assert_eq!(post_tls(&t, &[b"http/1.1"], &rustls::version::TLS13).await.status, StatusCode::OK);
    let tcp = TcpStream::connect(t.relay.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let refused = client(&old, &[b"http/1.1"], &rustls::version::TLS13).connect(name, tcp).await;
    assert!(refused.is_err(), "the old certificate is still served");
}

#[tokio::test]
async fn plaintext_on_the_tls_port_gets_no_http_answer() {
    let t = start_tls().await;
    let head = "POST /hooks/buttercms HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";
    let mut tcp = TcpStream::connect(t.relay.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/"), "{:?}", String::from_utf8_lossy(&answer));
}

#[tokio::test]
async fn tls_1_0_and_1_1_clients_are_refused() {
    let t = start_tls().await;
    let Ok(version) = std::process::Command::new("openssl").arg("version").output() else {
        println!("SKIPPED: no openssl client on this machine");
        return;
    };
    assert!(version.status.success());
    let addr = t.relay.addr.to_string();
    for flag in ["-tls1", "-tls1_1"] {
        let addr = addr.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &addr,
                    flag,
                    "-cipher",
                    "DEFAULT:@SECLEVEL=0",
                    "-servername",
                    "localhost",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{flag} handshake succeeded:\n{text}");
        // openssl says "New, TLSv1.x, Cipher is ..." only for a session it established.
        assert!(!text.contains("New, TLSv1"), "{flag}: {text}");
    }
    // The same tool at TLS 1.2 gets through, so the refusals above are about the version.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr, "-tls1_2", "-servername", "localhost"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("New, TLSv1.2"), "{}", String::from_utf8_lossy(&out.stdout));
}
