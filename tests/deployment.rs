//! `deploy/` checked against the code. No container engine or cluster runs where this is
//! tested, so the Dockerfile and the Kubernetes manifests are never built or applied here:
//! instead they are parsed and held to what the gateway really reads, binds and serves.
//!
//! Where the truth comes from:
//! - environment names and defaults: the real binary's `--help` (clap prints every
//!   option's `[env: NAME]` and `[default: ...]`), so a name that exists only in a comment
//!   or in the README does not count;
//! - whether a manifest's settings are a configuration the gateway accepts: its
//!   environment, turned into flags, goes through `Config::from_cli`, the validation the
//!   binary runs at start-up (the non-loopback gRPC address needs tokens, for one);
//! - routes: a gateway started here answers the probe paths and `/metrics`;
//! - series: the same gateway, driven through every event that creates a labelled family,
//!   must export every series the dashboard and the alert rules query.
//!
//! Why a bad file fails a test: an env name not printed by `--help` is not in the map
//! [`configuration`] builds from it, so [`unknown_env_names`] reports it; a queried series
//! (or a label, or a label value in an `=` or `!=` matcher) absent from `/metrics` is not in the
//! map [`exported`] builds from the scrape, so [`missing_series`] reports it. Both checks
//! come from the code's output, not from a list kept here, so a rename on either side
//! fails. `the_env_check_rejects_an_unknown_name` and
//! `the_series_check_rejects_bad_queries` run them on bad inputs (a misspelt variable, a
//! missing series, a histogram or counter queried without its suffix, a misspelt label
//! value), and a parser that silently found nothing would fail them.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use clap::Parser;
use serde_yaml_ng::Value;
use spike_gateway::{
    config::{Cli, Config},
    proto::{GetNutritionRecordRequest, spike_records_client::SpikeRecordsClient},
};
use support::{fake_spike::*, *};

/// Environment variables the gateway reads that are not clap options: the log filter of
/// `tracing-subscriber` (README "Configuration", `GATEWAY_LOG_FORMAT`).
const NON_CLAP_ENV: &[&str] = &["RUST_LOG"];

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["job", "instance"];

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

// ---------------------------------------------------------------------------------------
// What the binary says it reads: `spike-gateway --help`.

/// One option of `--help`: its flag and, when it has them, env name and default.
#[derive(Debug, Clone)]
struct HelpOption {
    flag: String,
    env: Option<String>,
    default: Option<String>,
}

fn help_text() -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_spike-gateway"))
        .arg("--help")
        .output()
        .expect("the binary runs");
    assert!(output.status.success(), "--help exits 0");
    String::from_utf8(output.stdout).expect("--help prints UTF-8")
}

/// Parses clap's long help: an option starts on a line `--flag <VALUE>` (or `-h, --help`),
/// and its `[env: NAME=]` / `[env: NAME]` and `[default: X]` lines follow.
fn parse_help(text: &str) -> Vec<HelpOption> {
    let mut options: Vec<HelpOption> = Vec::new();
    for line in text.lines().map(str::trim) {
        let flag = line
            .split(", ")
            .last()
            .filter(|_| line.starts_with('-'))
            .and_then(|part| part.strip_prefix("--"));
        if let Some(flag) = flag {
            options.push(HelpOption {
                flag: flag
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                env: None,
                default: None,
            });
        } else if let Some(current) = options.last_mut() {
            if let Some(rest) = line.strip_prefix("[env: ") {
                current.env = Some(rest.split(['=', ']']).next().unwrap().to_owned());
            } else if let Some(rest) = line.strip_prefix("[default: ") {
                current.default = Some(rest.trim_end_matches(']').to_owned());
            }
        }
    }
    options
}

/// Env name → option, from the real binary.
fn configuration() -> BTreeMap<String, HelpOption> {
    let options: BTreeMap<_, _> = parse_help(&help_text())
        .into_iter()
        .filter_map(|o| Some((o.env.clone()?, o)))
        .collect();
    // Guards the parser itself: clap's layout changing would otherwise empty the set.
    for name in ["GATEWAY_HTTP_ADDR", "GATEWAY_GRPC_TOKENS_FILE", "NATS_URL"] {
        assert!(
            options.contains_key(name),
            "--help lists {name}: {options:?}"
        );
    }
    options
}

/// Names in `names` the gateway does not read.
fn unknown_env_names<'a>(
    names: impl IntoIterator<Item = &'a str>,
    known: &BTreeMap<String, HelpOption>,
) -> Vec<String> {
    names
        .into_iter()
        .filter(|name| !known.contains_key(*name) && !NON_CLAP_ENV.contains(name))
        .map(str::to_owned)
        .collect()
}

fn default_of(known: &BTreeMap<String, HelpOption>, env: &str) -> String {
    known[env]
        .default
        .clone()
        .unwrap_or_else(|| panic!("{env} has a default"))
}

fn port_of(addr: &str) -> u16 {
    addr.parse::<std::net::SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr} is a socket address: {e}"))
        .port()
}

// ---------------------------------------------------------------------------------------
// The Dockerfile.

/// The instructions of the final stage (`FROM ... AS runtime` to the end), continuation
/// lines joined, comments dropped; and every `FROM` image.
struct Dockerfile {
    froms: Vec<String>,
    args: BTreeMap<String, String>,
    /// (instruction, arguments) of the runtime stage.
    runtime: Vec<(String, String)>,
    /// Sources of every `COPY` that reads the build context (not `--from=`).
    context_copies: Vec<String>,
}

fn parse_dockerfile(text: &str) -> Dockerfile {
    let mut joined = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(start) => {
                joined.push_str(start);
                joined.push(' ');
            }
            None => {
                joined.push_str(trimmed);
                joined.push('\n');
            }
        }
    }
    let mut file = Dockerfile {
        froms: Vec::new(),
        args: BTreeMap::new(),
        runtime: Vec::new(),
        context_copies: Vec::new(),
    };
    for line in joined.lines() {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        let instruction = instruction.to_ascii_uppercase();
        let rest = rest.trim().to_owned();
        match instruction.as_str() {
            "FROM" => {
                file.froms.push(rest.clone());
                file.runtime.clear();
            }
            "ARG" if file.froms.is_empty() => {
                if let Some((name, value)) = rest.split_once('=') {
                    file.args.insert(name.to_owned(), value.to_owned());
                }
            }
            "COPY" if !rest.starts_with("--from") => {
                let parts: Vec<_> = rest.split_whitespace().collect();
                file.context_copies
                    .extend(parts[..parts.len() - 1].iter().map(|s| s.to_string()));
            }
            _ => {}
        }
        file.runtime.push((instruction, rest));
    }
    file
}

impl Dockerfile {
    fn all(&self, instruction: &str) -> Vec<&str> {
        self.runtime
            .iter()
            .filter(|(i, _)| i == instruction)
            .map(|(_, rest)| rest.as_str())
            .collect()
    }

    /// `ENV A=1 B=2` pairs of the runtime stage.
    fn env(&self) -> BTreeMap<String, String> {
        self.all("ENV")
            .iter()
            .flat_map(|rest| rest.split_whitespace())
            .map(|pair| {
                let (k, v) = pair.split_once('=').expect("ENV uses NAME=value");
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    fn substitute(&self, text: &str) -> String {
        self.args.iter().fold(text.to_owned(), |text, (k, v)| {
            text.replace(&format!("${{{k}}}"), v)
        })
    }
}

#[test]
fn dockerfile_env_and_ports_match_the_configuration() {
    let known = configuration();
    let docker = parse_dockerfile(&read("deploy/Dockerfile"));
    let env = docker.env();
    let unknown = unknown_env_names(env.keys().map(String::as_str), &known);
    assert!(
        unknown.is_empty(),
        "Dockerfile ENV the gateway does not read: {unknown:?}"
    );

    // The exposed ports are the ones the gateway binds with this environment.
    let exposed: BTreeSet<u16> = docker
        .all("EXPOSE")
        .iter()
        .flat_map(|rest| rest.split_whitespace())
        .map(|p| p.parse().expect("EXPOSE takes port numbers"))
        .collect();
    let http = port_of(&env["GATEWAY_HTTP_ADDR"]);
    let grpc = port_of(&env["GATEWAY_GRPC_ADDR"]);
    assert_eq!(exposed, BTreeSet::from([http, grpc]));
    assert_eq!(http, port_of(&default_of(&known, "GATEWAY_HTTP_ADDR")));
    assert_eq!(grpc, port_of(&default_of(&known, "GATEWAY_GRPC_ADDR")));
    assert_eq!(env["GATEWAY_GRPC_ADDR"], "0.0.0.0:50051");
}

#[test]
fn dockerfile_runs_non_root_with_the_data_dir_its_only_volume() {
    let docker = parse_dockerfile(&read("deploy/Dockerfile"));
    let env = docker.env();
    // Non-root by number (runAsNonRoot can only verify a numeric user), and the data dir
    // is the declared volume.
    let user = docker.all("USER");
    let uid: u32 = user
        .last()
        .expect("the runtime stage sets USER")
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("USER is numeric");
    assert_ne!(uid, 0, "the image runs as root");
    assert_eq!(uid, 10001, "the manifests' runAsUser is 10001");
    let volumes = docker.all("VOLUME");
    assert_eq!(volumes.len(), 1, "one volume: {volumes:?}");
    assert!(
        volumes[0].contains(&format!("\"{}\"", env["GATEWAY_DATA_DIR"])),
        "the volume is GATEWAY_DATA_DIR: {volumes:?}"
    );
    assert_eq!(docker.all("STOPSIGNAL"), ["SIGTERM"]);
    assert_eq!(
        docker.all("ENTRYPOINT"),
        [r#"["/usr/local/bin/spike-gateway"]"#]
    );
}

#[test]
fn dockerfile_builds_the_crate_on_one_debian_release() {
    let docker = parse_dockerfile(&read("deploy/Dockerfile"));
    // Builder and runtime on one Debian release (glibc), the builder's Rust no older
    // than the crate's rust-version.
    let froms: Vec<_> = docker.froms.iter().map(|f| docker.substitute(f)).collect();
    let release = &docker.args["DEBIAN_RELEASE"];
    assert!(froms[0].starts_with("rust:") && froms[0].contains(release.as_str()));
    assert!(
        froms[1].starts_with(&format!("debian:{release}-slim")),
        "{froms:?}"
    );
    let floor = rust_version(&read("Cargo.toml"));
    let builder = &docker.args["RUST_VERSION"];
    assert!(
        version_at_least(builder, &floor),
        "builder Rust {builder} is older than rust-version {floor}"
    );
    dockerfile_copies_exist_and_are_not_ignored(&docker);
}

/// Every path the build copies from the context exists and is not in `.dockerignore`.
fn dockerfile_copies_exist_and_are_not_ignored(docker: &Dockerfile) {
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    assert!(
        ignored.iter().any(|i| i == "target"),
        "target/ stays out of the context"
    );
    for source in &docker.context_copies {
        assert!(repo_file(source).exists(), "COPY {source}: no such path");
        assert!(
            !ignored.iter().any(|i| i == source.trim_end_matches('/')),
            "COPY {source} is excluded by .dockerignore"
        );
    }
    // What cargo needs to build the binary: the manifest's files and the crate's sources.
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "proto",
        "src",
        "benches",
    ] {
        assert!(
            docker.context_copies.iter().any(|c| c == needed),
            "the build copies {needed}"
        );
    }
}

/// Cargo.toml's `rust-version`, without a TOML dependency for one line.
fn rust_version(manifest: &str) -> String {
    let line = manifest
        .lines()
        .find(|l| l.starts_with("rust-version"))
        .expect("Cargo.toml sets rust-version");
    line.split('"')
        .nth(1)
        .expect("rust-version is a string")
        .to_owned()
}

/// `a >= b` for dotted versions.
fn version_at_least(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    parse(a) >= parse(b)
}

// ---------------------------------------------------------------------------------------
// The Kubernetes manifests.

/// Every document of every YAML file in `dir` but the kustomization.
fn manifests(dir: &str) -> Vec<Value> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for file in kustomization_resources(dir) {
        let text = read(&format!("{dir}/{file}"));
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{dir}/{file}: {e}"));
            if !value.is_null() {
                docs.push(value);
            }
        }
    }
    docs
}

fn kustomization_resources(dir: &str) -> Vec<String> {
    let kustomization: Value =
        serde_yaml_ng::from_str(&read(&format!("{dir}/kustomization.yaml"))).unwrap();
    kustomization["resources"]
        .as_sequence()
        .expect("the kustomization lists resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn str_at<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is a string: {value:?}"))
}

/// The gateway workload of a directory, its pod spec and its container.
struct Workload<'a> {
    workload: &'a Value,
    pod: &'a Value,
    container: &'a Value,
}

fn workload<'a>(docs: &'a [Value], kind: &str) -> Workload<'a> {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "one {kind}");
    let pod = &found[0]["spec"]["template"]["spec"];
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    Workload {
        workload: found[0],
        pod,
        container: &containers[0],
    }
}

impl Workload<'_> {
    /// Every env entry: name and literal value (None for `valueFrom`).
    fn env(&self) -> Vec<(String, Option<String>)> {
        self.container["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .map(|e| {
                let value = e["value"].as_str().map(str::to_owned);
                (str_at(&e["name"], "env name").to_owned(), value)
            })
            .collect()
    }

    fn env_value(&self, name: &str) -> Option<String> {
        self.env().into_iter().find(|(n, _)| n == name)?.1
    }

    /// The container port named `name`.
    fn port(&self, name: &str) -> u16 {
        let ports = self.container["ports"].as_sequence().expect("ports");
        let port = ports
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("a container port named {name}"));
        port["containerPort"].as_u64().unwrap() as u16
    }

    fn mounts(&self) -> Vec<&Value> {
        self.container["volumeMounts"]
            .as_sequence()
            .map(|m| m.iter().collect())
            .unwrap_or_default()
    }
}

const MODES: [(&str, &str); 2] = [
    ("deploy/k8s/embedded", "StatefulSet"),
    ("deploy/k8s/nats", "Deployment"),
];

/// Names in a manifest's container env the gateway does not read.
fn manifest_unknown_env(
    docs: &[Value],
    kind: &str,
    known: &BTreeMap<String, HelpOption>,
) -> Vec<String> {
    let env = workload(docs, kind).env();
    unknown_env_names(env.iter().map(|(n, _)| n.as_str()), known)
}

#[test]
fn manifests_name_only_variables_the_gateway_reads() {
    let known = configuration();
    for (dir, kind) in MODES {
        let docs = manifests(dir);
        let unknown = manifest_unknown_env(&docs, kind, &known);
        assert!(unknown.is_empty(), "{dir}: unknown env {unknown:?}");
        let env = workload(&docs, kind).env();
        // Secrets only through files: a secret's own variable would put it in the pod spec.
        for secret in [
            "SPIKE_WEBHOOK_SIGNATURE_KEY",
            "GATEWAY_GRPC_TOKENS",
            "GATEWAY_ADMIN_TOKENS",
            "SPIKE_HMAC_KEY",
        ] {
            let file = format!("{secret}_FILE");
            assert!(known.contains_key(&file), "the gateway reads {file}");
            assert!(env.iter().any(|(n, _)| *n == file), "{dir} sets {file}");
            assert!(
                !env.iter().any(|(n, _)| n == secret),
                "{dir} sets {secret} itself"
            );
        }
    }
}

/// A manifest's environment as the gateway's own flags, `_FILE` paths moved to files
/// written under `secrets` (the mounted Secret does not exist here).
fn as_flags(
    env: &[(String, Option<String>)],
    known: &BTreeMap<String, HelpOption>,
    secrets: &Path,
) -> Vec<String> {
    let mut argv = vec!["spike-gateway".to_owned()];
    for (name, value) in env {
        let (Some(option), Some(value)) = (known.get(name), value) else {
            continue; // RUST_LOG, or a value from a ConfigMap
        };
        let value = if name.ends_with("_FILE") {
            let file = secrets.join(name);
            std::fs::write(&file, "a-secret-value\n").unwrap();
            file.to_str().unwrap().to_owned()
        } else {
            value.clone()
        };
        argv.push(format!("--{}={value}", option.flag));
    }
    argv
}

#[test]
fn manifests_are_configurations_the_gateway_accepts() {
    let known = configuration();
    for (dir, kind) in MODES {
        let docs = manifests(dir);
        let workload = workload(&docs, kind);
        let secrets = tempfile::tempdir().unwrap();
        let argv = as_flags(&workload.env(), &known, secrets.path());
        let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{dir}: {e}"));
        let config = Config::from_cli(cli).unwrap_or_else(|e| panic!("{dir}: {e}"));
        // gRPC on all interfaces, accepted because the tokens file is set.
        assert!(!config.grpc_addr.ip().is_loopback(), "{dir}");
        assert!(!config.grpc.tokens.is_empty(), "{dir}");
        assert_eq!(config.http_addr.port(), workload.port("http"), "{dir}");
        assert_eq!(config.grpc_addr.port(), workload.port("grpc"), "{dir}");

        // Every secret file lies under a read-only mount of a Secret volume.
        let secret_mounts: Vec<&str> = workload
            .mounts()
            .into_iter()
            .filter(|m| {
                let volume = pod_volume(workload.pod, str_at(&m["name"], "mount name"));
                volume.is_some_and(|v| !v["secret"].is_null()) && m["readOnly"] == true
            })
            .map(|m| str_at(&m["mountPath"], "mountPath"))
            .collect();
        for (name, value) in workload.env() {
            if name.ends_with("_FILE") {
                let path = value.expect("a _FILE variable has a literal path");
                assert!(
                    secret_mounts
                        .iter()
                        .any(|m| path.starts_with(&format!("{m}/"))),
                    "{dir}: {name}={path} is not under a read-only Secret mount {secret_mounts:?}"
                );
            }
        }
    }
}

fn pod_volume<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod["volumes"]
        .as_sequence()?
        .iter()
        .find(|v| v["name"] == name)
}

#[test]
fn pods_run_non_root_on_a_read_only_root_with_the_data_dir_the_only_writable_path() {
    for (dir, kind) in MODES {
        let docs = manifests(dir);
        let w = workload(&docs, kind);
        assert_eq!(w.pod["securityContext"]["runAsNonRoot"], true, "{dir}");
        assert_eq!(w.pod["securityContext"]["runAsUser"], 10001, "{dir}");
        let container = &w.container["securityContext"];
        assert_eq!(container["readOnlyRootFilesystem"], true, "{dir}");
        assert_eq!(container["allowPrivilegeEscalation"], false, "{dir}");

        let writable: Vec<&str> = w
            .mounts()
            .into_iter()
            .filter(|m| m["readOnly"] != true)
            .map(|m| str_at(&m["mountPath"], "mountPath"))
            .collect();
        match kind {
            "StatefulSet" => {
                let data_dir = w.env_value("GATEWAY_DATA_DIR").expect("GATEWAY_DATA_DIR");
                assert_eq!(writable, [data_dir.as_str()], "{dir}");
                // ... and that mount is the claim, not an emptyDir.
                let claims = w.workload["spec"]["volumeClaimTemplates"]
                    .as_sequence()
                    .expect("a volume claim template");
                let data = w
                    .mounts()
                    .into_iter()
                    .find(|m| m["mountPath"] == data_dir.as_str());
                assert_eq!(
                    claims[0]["metadata"]["name"],
                    data.unwrap()["name"],
                    "{dir}"
                );
            }
            _ => assert!(
                writable.is_empty(),
                "{dir}: NATS mode writes nothing: {writable:?}"
            ),
        }
    }
}

#[test]
fn termination_grace_exceeds_the_gateway_shutdown_grace() {
    let known = configuration();
    for (dir, kind) in MODES {
        let docs = manifests(dir);
        let w = workload(&docs, kind);
        let grace = w
            .env_value("GATEWAY_SHUTDOWN_GRACE")
            .unwrap_or_else(|| default_of(&known, "GATEWAY_SHUTDOWN_GRACE"));
        let grace = humantime::parse_duration(&grace).expect("a duration");
        let kubelet = w.pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds is set");
        assert!(
            Duration::from_secs(kubelet) > grace,
            "{dir}: terminationGracePeriodSeconds {kubelet} is not above GATEWAY_SHUTDOWN_GRACE {grace:?}"
        );
    }
}

#[test]
fn modes_are_one_embedded_replica_and_three_on_nats() {
    let embedded = manifests("deploy/k8s/embedded");
    let w = workload(&embedded, "StatefulSet");
    assert_eq!(w.workload["spec"]["replicas"], 1);
    assert_eq!(w.env_value("GATEWAY_STORE").as_deref(), Some("embedded"));
    let headless = w.workload["spec"]["serviceName"].as_str().unwrap();
    let governing = of_kind(&embedded, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == headless)
        .expect("the StatefulSet's serviceName exists");
    assert_eq!(governing["spec"]["clusterIP"], "None");

    let nats = manifests("deploy/k8s/nats");
    let w = workload(&nats, "Deployment");
    assert_eq!(w.workload["spec"]["replicas"], 3);
    assert_eq!(w.env_value("GATEWAY_STORE").as_deref(), Some("nats"));
    assert!(
        w.env_value("NATS_URL")
            .is_some_and(|u| u.starts_with("nats://"))
    );
}

#[test]
fn kustomizations_list_every_manifest_in_their_directory() {
    for (dir, _) in MODES {
        let listed: BTreeSet<String> = kustomization_resources(dir).into_iter().collect();
        let present: BTreeSet<String> = std::fs::read_dir(repo_file(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
            .collect();
        assert_eq!(listed, present, "{dir}");
    }
}

/// Probe paths, the ports they and the Services name, and the scrape annotation, against a
/// running gateway's routes.
#[tokio::test]
async fn probes_services_and_scrape_target_match_the_gateway() {
    let app = spawn_app().await;
    let status = async |path: &str| -> u16 {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        response.status().as_u16()
    };
    for (dir, kind) in MODES {
        let docs = manifests(dir);
        let w = workload(&docs, kind);
        let http = w.port("http");
        assert_eq!(
            Some(http),
            w.env_value("GATEWAY_HTTP_ADDR").map(|a| port_of(&a)),
            "{dir}"
        );
        for (probe, path) in [
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ] {
            let get = &w.container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{dir} {probe}");
            assert_eq!(get["port"], "http", "{dir} {probe}");
            assert_eq!(
                status(path).await,
                200,
                "{dir} {probe}: the gateway serves {path}"
            );
        }
        let annotations = &w.workload["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/port"], http.to_string().as_str());
        let metrics_path = str_at(&annotations["prometheus.io/path"], "scrape path");
        assert_eq!(status(metrics_path).await, 200, "{dir}: scrape path");

        // Every Service targets a named port of the container, with the same number.
        for service in of_kind(&docs, "Service") {
            for port in service["spec"]["ports"].as_sequence().unwrap() {
                let target = str_at(&port["targetPort"], "targetPort");
                assert_eq!(port["port"], w.port(target), "{dir}: {target}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The dashboard and the alert rules.

/// A series a query names, and the label matchers written on it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Selector {
    name: String,
    /// (label, operator, value).
    matchers: Vec<(String, String, String)>,
}

/// Every `spike_gateway_*` selector in a PromQL expression, and the labels its `by` /
/// `without` / `ignoring` / `on` clauses name. A plain scan rather than a PromQL parser:
/// the gateway's names are the only identifiers with that prefix.
fn parse_query(expr: &str) -> (Vec<Selector>, BTreeSet<String>) {
    let mut selectors = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("spike_gateway_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        let mut selector = Selector {
            name: tail[..end].to_owned(),
            matchers: Vec::new(),
        };
        rest = &tail[end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let close = inner.find('}').expect("a closed label matcher");
            selector.matchers = parse_matchers(&inner[..close]);
            rest = &inner[close + 1..];
        }
        selectors.push(selector);
    }
    let mut grouping = BTreeSet::new();
    for keyword in ["by", "without", "ignoring", "on"] {
        let mut rest = expr;
        while let Some(at) = rest.find(&format!("{keyword} (")) {
            let inner = &rest[at + keyword.len() + 2..];
            let close = inner.find(')').expect("a closed label list");
            grouping.extend(inner[..close].split(',').map(|l| l.trim().to_owned()));
            rest = &inner[close..];
        }
    }
    (selectors, grouping)
}

fn parse_matchers(text: &str) -> Vec<(String, String, String)> {
    text.split(',')
        .filter(|m| !m.trim().is_empty())
        .map(|m| {
            let op_at = m.find(['=', '!']).expect("a matcher has an operator");
            let after = &m[op_at..];
            let op_len =
                if after.starts_with("=~") || after.starts_with("!=") || after.starts_with("!~") {
                    2
                } else {
                    1
                };
            (
                m[..op_at].trim().to_owned(),
                after[..op_len].to_owned(),
                after[op_len..].trim().trim_matches('"').to_owned(),
            )
        })
        .collect()
}

/// Every PromQL expression of the dashboard (panel targets, rows included).
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/spike-gateway.json")).expect("dashboard JSON");
    let mut queries = Vec::new();
    let mut panels: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(
                target["expr"]
                    .as_str()
                    .expect("a target has an expr")
                    .to_owned(),
            );
        }
    }
    queries
}

/// Every alert and recording rule expression.
fn rule_queries(text: &str) -> Vec<(String, String)> {
    let rules: Value = serde_yaml_ng::from_str(text).expect("rules YAML");
    let mut queries = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .expect("a named rule");
            queries.push((name.to_owned(), str_at(&rule["expr"], "expr").to_owned()));
        }
    }
    queries
}

/// Whether `query` is valid PromQL (Prometheus' grammar, as the `promql-parser` crate
/// implements it), with Grafana's `$__rate_interval` read as a plain range.
fn promql_syntax(query: &str) -> Result<(), String> {
    promql_parser::parser::parse(&query.replace("$__rate_interval", "5m")).map(|_| ())
}

/// An OpenMetrics exposition: series name → every label set of its samples.
fn exported(text: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut series: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = match line[name_end..].strip_prefix('{') {
            Some(inner) => parse_matchers(&inner[..inner.find('}').unwrap()])
                .into_iter()
                .map(|(label, _, value)| (label, value))
                .collect(),
            None => BTreeMap::new(),
        };
        series
            .entry(line[..name_end].to_owned())
            .or_default()
            .push(labels);
    }
    series
}

/// What `query` asks for that the exposition does not have: series, labels on them, or
/// (for `=` and `!=` matchers) label values.
fn missing_series(query: &str, exposition: &str) -> Vec<String> {
    let exported = exported(exposition);
    let (selectors, grouping) = parse_query(query);
    let mut missing = Vec::new();
    if let Err(e) = promql_syntax(query) {
        missing.push(format!("not PromQL: {e}: {query}"));
    }
    if selectors.is_empty() {
        missing.push(format!("no spike_gateway_ series in {query}"));
    }
    let mut labels_seen: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
    for selector in &selectors {
        let Some(samples) = exported.get(&selector.name) else {
            missing.push(selector.name.clone());
            continue;
        };
        labels_seen.extend(samples.iter().flat_map(|s| s.keys().map(String::as_str)));
        for (label, op, value) in &selector.matchers {
            let has_label = samples.iter().any(|s| s.contains_key(label));
            let has_value = samples.iter().any(|s| s.get(label) == Some(value));
            // A misspelt value under `!=` silently matches everything, so it counts too.
            if !has_label || (matches!(op.as_str(), "=" | "!=") && !has_value) {
                missing.push(format!("{}{{{label}{op}\"{value}\"}}", selector.name));
            }
        }
    }
    for label in grouping {
        if !labels_seen.contains(label.as_str()) {
            missing.push(format!("label {label} grouped on in {query}"));
        }
    }
    missing
}

/// A gateway driven through every event that creates a labelled family, then scraped.
///
/// A family with labels (`webhooks_total`, `webhook_ack_seconds`, `events_appended_total`,
/// `dead_letters_total`, `dead_letter_reasons_total`, `upstream_calls_total`,
/// `upstream_call_seconds`, `grpc_server_requests_total`, `grpc_server_request_seconds`,
/// `readiness`) exports no sample until its first label set
/// exists, so a fresh gateway would fail this check for reasons of timing, not naming.
/// Each is produced here: a webhook that appends (and its duplicate), one that becomes a
/// dead letter, a delivery to a subscriber, one proxied (unary) call to a fake Spike, the
/// readiness reporter's first report (awaited with a deadline), and a consumer group with
/// a delivery (the `consumer_group_*{group}` series exist once a group does). The unlabelled families
/// (`duplicates_total`, `dead_letters_stored`, `subscribers`, `subscriber_lag_events`,
/// `delivery_seconds`) are exported from the start. In production a query over a family
/// not yet created shows "no data", and a rule over it does not fire, which is right for
/// every rule here (no failures, no dead letters, no lag yet).
async fn scrape_after_every_event() -> String {
    let fake = FakeSpike::start().await;
    fake.script(
        "GET /nutrition_records/missing",
        vec![Scripted::problem(404, "none")],
    );
    let app = gateway_proxying_to(&fake.url).await;
    let mut stream = app.subscribe(from_beginning()).await.unwrap();
    for _ in 0..2 {
        let response = app.post(MAIN, &fixture("main-batch.json")).await;
        assert_eq!(response.status().as_u16(), 200);
    }
    let response = app
        .post_json(MAIN, &serde_json::json!({"hello": "world"}))
        .await;
    assert_eq!(response.status().as_u16(), 200);
    take(&mut stream, 1).await;
    // A consumer group: its series exist once there is a group.
    let mut member = support::consume::join(&app, support::consume::open_request("deploy"))
        .await
        .unwrap();
    member.take(1).await;
    let mut client = SpikeRecordsClient::connect(format!("http://{}", app.grpc))
        .await
        .unwrap();
    let call = client
        .get_nutrition_record(GetNutritionRecordRequest {
            application_user_id: "u".into(),
            record_id: "missing".into(),
        })
        .await;
    assert!(call.is_err(), "the fake answers 404");
    eventually(
        Duration::from_secs(10),
        "readiness is reported on /metrics",
        async || {
            let text = app
                .client
                .get(app.url("/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("spike_gateway_readiness{").then_some(text)
        },
    )
    .await
}

#[tokio::test]
async fn every_series_the_dashboard_and_alerts_query_is_exported() {
    let exposition = scrape_after_every_event().await;
    let mut queries: Vec<(String, String)> = dashboard_queries()
        .into_iter()
        .map(|q| ("dashboard".to_owned(), q))
        .collect();
    queries.extend(rule_queries(&read("deploy/prometheus/alerts.yaml")));
    assert!(
        queries.len() >= 20,
        "the files hold the queries: {}",
        queries.len()
    );
    let problems: Vec<String> = queries
        .iter()
        .flat_map(|(source, query)| {
            missing_series(query, &exposition)
                .into_iter()
                .map(move |m| format!("{source}: {m}"))
        })
        .collect();
    assert!(
        problems.is_empty(),
        "queried but not exported: {problems:#?}"
    );

    // The rules the issue asks for are there.
    let alerts: BTreeSet<String> = rule_queries(&read("deploy/prometheus/alerts.yaml"))
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for alert in [
        "SpikeGatewayWebhookFailureRate",
        "SpikeGatewayNotReady",
        "SpikeGatewaySubscriberLag",
        "SpikeGatewayDeadLettersGrowing",
        "SpikeGatewayConsumerGroupPendingGrowing",
        "SpikeGatewayEventLogCommitSlow",
    ] {
        assert!(alerts.contains(alert), "{alert} in {alerts:?}");
    }
}

/// The env check on a manifest that must fail it: without this, a parser that found no
/// env entries would pass every file.
#[test]
fn the_env_check_rejects_an_unknown_name() {
    let known = configuration();
    let bad_manifest: Vec<Value> = vec![
        serde_yaml_ng::from_str(
            r"
kind: Deployment
spec:
  template:
    spec:
      containers:
        - name: spike-gateway
          env:
            - name: GATEWAY_HTTP_ADDR
              value: 0.0.0.0:8080
            - name: GATEWAY_GRPC_TOKEN_FILE
              value: /run/secrets/t
",
        )
        .unwrap(),
    ];
    assert_eq!(
        manifest_unknown_env(&bad_manifest, "Deployment", &known),
        ["GATEWAY_GRPC_TOKEN_FILE"]
    );
}

/// The series check on queries that must fail it, and on two that must pass.
#[test]
fn the_series_check_rejects_bad_queries() {
    let exposition = "# TYPE spike_gateway_webhooks counter\n\
        spike_gateway_webhooks_total{category=\"main\",outcome=\"accepted\"} 1\n\
        spike_gateway_delivery_seconds_bucket{le=\"0.1\"} 1\n\
        # EOF\n";
    assert!(
        missing_series(
            "sum by (outcome) (rate(spike_gateway_webhooks_total{outcome!=\"accepted\"}[5m]))",
            exposition
        )
        .is_empty()
    );
    assert!(
        missing_series("histogram_quantile(0.99, sum by (le) (rate(spike_gateway_delivery_seconds_bucket[5m])))", exposition)
            .is_empty()
    );
    // A missing series, a histogram queried without its suffix, a counter without
    // `_total`, an unknown label value, label and grouping label.
    for (query, expected) in [
        (
            "rate(spike_gateway_nope_total[5m])",
            "spike_gateway_nope_total",
        ),
        (
            "rate(spike_gateway_delivery_seconds[5m])",
            "spike_gateway_delivery_seconds",
        ),
        ("rate(spike_gateway_webhooks[5m])", "spike_gateway_webhooks"),
        (
            "spike_gateway_webhooks_total{outcome=\"acepted\"}",
            "spike_gateway_webhooks_total{outcome=\"acepted\"}",
        ),
        (
            "spike_gateway_webhooks_total{outcome!=\"acepted\"}",
            "spike_gateway_webhooks_total{outcome!=\"acepted\"}",
        ),
        (
            "spike_gateway_webhooks_total{path!=\"x\"}",
            "spike_gateway_webhooks_total{path!=\"x\"}",
        ),
        ("sum by (kind) (spike_gateway_webhooks_total)", "label kind"),
        ("vector(1)", "no spike_gateway_ series"),
        ("sum(rate(spike_gateway_webhooks_total[5m])", "not PromQL"),
    ] {
        let missing = missing_series(query, exposition);
        assert!(
            missing.iter().any(|m| m.starts_with(expected)),
            "{query}: {missing:?}"
        );
    }
}

#[test]
fn the_help_parser_reads_env_names_and_defaults() {
    let options = parse_help(
        "Options:\n      --http-addr <HTTP_ADDR>\n          Address\n\n          \
         [env: GATEWAY_HTTP_ADDR=]\n          [default: 0.0.0.0:8080]\n\n      \
         --grpc-tokens <GRPC_TOKENS>\n          [env: GATEWAY_GRPC_TOKENS]\n  \
         -h, --help\n          Print help\n",
    );
    assert_eq!(options.len(), 3);
    assert_eq!(options[0].flag, "http-addr");
    assert_eq!(options[0].env.as_deref(), Some("GATEWAY_HTTP_ADDR"));
    assert_eq!(options[0].default.as_deref(), Some("0.0.0.0:8080"));
    assert_eq!(options[1].env.as_deref(), Some("GATEWAY_GRPC_TOKENS"));
    assert_eq!(options[2].flag, "help");
    assert_eq!(options[2].env, None);
}
