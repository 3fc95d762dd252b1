//! gRPC over TLS and mutual TLS, with certificates generated here.

mod support;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use support::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    stranger: (String, String),
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(names: &[&str], issuer: &CertifiedIssuer<'static, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, issuer)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let ca = new_ca("gateway test CA");
    let other = new_ca("someone else's CA");
    Pki {
        ca_pem: ca.pem(),
        server: leaf(&["localhost"], &ca),
        client: leaf(&["subscriber.internal"], &ca),
        stranger: leaf(&["intruder"], &other),
    }
}

/// Writes the server's files and returns the TLS flags.
fn server_flags(dir: &std::path::Path, pki: &Pki, mutual: bool) -> Vec<String> {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let mut flags = vec![
        "--grpc-tls-cert".to_owned(),
        write("server.pem", &pki.server.0),
        "--grpc-tls-key".into(),
        write("server.key", &pki.server.1),
    ];
    if mutual {
        flags.extend([
            "--grpc-tls-client-ca".to_owned(),
            write("ca.pem", &pki.ca_pem),
        ]);
    }
    flags
}

async fn health_over_tls(
    app: &TestApp,
    pki: &Pki,
    identity: Option<&(String, String)>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", app.grpc.port()))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("call: {e:?}"))
}

async fn health_in_plaintext(app: &TestApp) -> Result<(), String> {
    let channel = Channel::from_shared(format!("http://{}", app.grpc))
        .unwrap()
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_certificate_and_refuses_plaintext() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let flags = server_flags(dir.path(), &pki, false);
    let app = spawn_app_with(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    health_over_tls(&app, &pki, None)
        .await
        .expect("TLS handshake and call");
    assert!(
        health_in_plaintext(&app).await.is_err(),
        "plaintext is refused"
    );
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_configured_ca() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let flags = server_flags(dir.path(), &pki, true);
    let app = spawn_app_with(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    health_over_tls(&app, &pki, Some(&pki.client))
        .await
        .expect("a trusted client certificate");
    let without = health_over_tls(&app, &pki, None).await;
    assert!(without.is_err(), "no client certificate: {without:?}");
    let stranger = health_over_tls(&app, &pki, Some(&pki.stranger)).await;
    assert!(
        stranger.is_err(),
        "a certificate from another CA: {stranger:?}"
    );
}

#[tokio::test]
async fn unreadable_tls_files_stop_the_start() {
    use clap::Parser;
    use spike_gateway::{
        app::Application,
        config::{Cli, Config},
    };
    let cli = Cli::try_parse_from([
        "spike-gateway",
        "--webhook-signature-key",
        "k",
        "--store",
        "memory",
        "--http-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
        "--grpc-tls-cert",
        "/nonexistent/cert.pem",
        "--grpc-tls-key",
        "/nonexistent/key.pem",
    ])
    .unwrap();
    let err = Application::build(Config::from_cli(cli).unwrap())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
}
