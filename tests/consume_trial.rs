//! Issue 12's "done means", tried as a new user would: two `examples/consume` workers
//! share one group on the real gateway binary; one is killed (SIGKILL) mid-work, the other
//! finishes the work; the gateway is restarted (SIGTERM) under it and more events come;
//! nothing is lost, and nothing is acked twice beyond the at-least-once window.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use spike_gateway::proto::{ListConsumerGroupsRequest, admin_client::AdminClient};
use support::{KEY, MAIN, admin, eventually, real_binary, record_change, wait_until_blocking};

/// Each worker's `--max-in-flight`: also the most deliveries one worker holds when its
/// stream ends, so the most that can come back after the worker printed "acked" (its ack
/// not yet sent, or not yet applied when the stream ended).
const MAX_IN_FLIGHT: u64 = 4;

/// Stream ends in the trial: the killed worker's, and the survivor's at the restart.
const STREAM_ENDS: u64 = 2;

/// The `consume` example of this test's profile and target directory. `cargo test`
/// builds the examples, but `cargo test --test consume_trial` (or `--tests`) does not, so
/// it is built here when it is missing or older than its source (cargo releases its lock
/// before it runs the tests).
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/consume_trial-<hash>
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let binary = profile_dir.join("examples").join("consume");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/consume.rs");
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    if modified(&binary) >= modified(&source) {
        return binary;
    }
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build
        .args(["build", "--quiet", "--example", "consume", "--target-dir"])
        .arg(profile_dir.parent().unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            build.arg("--release");
        }
        Some(profile) => {
            build.args(["--profile", profile]);
        }
        None => panic!("no profile directory above {}", exe.display()),
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "cargo build --example consume: {status}");
    binary
}

/// A port free now, for a gateway that must come back on the same address.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn gateway(data_dir: &Path, grpc: SocketAddr) -> real_binary::Gateway {
    let mut command = real_binary::command(data_dir, KEY);
    command
        .env("GATEWAY_GRPC_ADDR", grpc.to_string())
        .env("GATEWAY_ADMIN_TOKENS", admin::ADMIN_TOKEN);
    real_binary::start(command).unwrap_or_else(|log| panic!("the gateway refused to start:\n{log}"))
}

/// A running worker and every line it printed so far.
struct Worker {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    fn start(binary: &Path, grpc: SocketAddr, extra: &[&str]) -> Self {
        let mut child = Command::new(binary)
            .args(["--addr", &format!("http://{grpc}"), "--group", "trial"])
            .args(["--from-beginning", "--work", "20ms"])
            .args(["--max-in-flight", &MAX_IN_FLIGHT.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the example starts");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let copy = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                copy.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    fn printed(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// (sequence, attempt, outcome) of each printed delivery.
    fn deliveries(&self) -> Vec<(u64, u32, String)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| parse(l))
            .collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sequence=12 attempt=1 user=u type=EVENT_TYPE_RECORD_CHANGE acked`.
fn parse(line: &str) -> (u64, u32, String) {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_owned()
    };
    let outcome = line.rsplit(' ').next().unwrap().to_owned();
    (
        field("sequence=").parse().unwrap(),
        field("attempt=").parse().unwrap(),
        outcome,
    )
}

async fn post(gateway: &real_binary::Gateway, range: std::ops::Range<u64>) {
    for n in range {
        let user = format!("user-{}", n % 5);
        assert_eq!(
            gateway.post_json(KEY, MAIN, &record_change(&user, n)).await,
            200
        );
    }
}

async fn members(gateway: &real_binary::Gateway) -> Option<u64> {
    let mut admin_client = AdminClient::new(gateway.channel().await);
    let rows = admin_client
        .list_consumer_groups(admin::authed(ListConsumerGroupsRequest {}))
        .await
        .ok()?
        .into_inner()
        .groups;
    rows.into_iter()
        .find(|g| g.group == "trial")
        .map(|g| g.members)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_example_workers_share_a_group_through_a_kill_and_a_restart() {
    let binary = example_binary();
    let dir = tempfile::tempdir().unwrap();
    let grpc = free_port();
    let mut gateway = gateway(dir.path(), grpc);
    // A backlog first, so both workers hold a full window while they work.
    post(&gateway, 0..100).await;
    let mut killed = Worker::start(&binary, grpc, &[]);
    let mut survivor = Worker::start(&binary, grpc, &["--exit-when-idle", "5s"]);
    eventually(Duration::from_secs(30), "both workers joined", async || {
        (members(&gateway).await == Some(2)).then_some(())
    })
    .await;

    // Kill one mid-work: what it held goes to the other.
    wait_until_blocking(Duration::from_secs(30), "the first worker works", || {
        killed.printed() >= 10
    });
    killed.child.kill().expect("SIGKILL");
    killed.child.wait().unwrap();
    // Restart the gateway under the survivor, then send more.
    wait_until_blocking(Duration::from_secs(30), "the survivor works on", || {
        survivor.printed() >= 50
    });
    let exit = gateway.terminate(Duration::from_secs(15));
    assert!(exit.success(), "{exit}");
    drop(gateway);
    let gateway = self::gateway(dir.path(), grpc);
    post(&gateway, 100..150).await;

    wait_until_blocking(Duration::from_secs(60), "the survivor finishes", || {
        survivor.child.try_wait().unwrap().is_some()
    });
    assert!(survivor.child.wait().unwrap().success());
    check(&killed.deliveries(), &survivor.deliveries());
}

/// Nothing lost: every sequence acked. Nothing repeated beyond at least once: a second
/// ack only for an event the group redelivered (attempt ≥ 2), and no more of those than
/// one window per stream end; what the killed worker held comes back with attempt ≥ 2.
fn check(killed: &[(u64, u32, String)], survivor: &[(u64, u32, String)]) {
    let mut acks: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (sequence, attempt, outcome) in killed.iter().chain(survivor) {
        assert_eq!(outcome, "acked", "no switch makes them nak or die");
        acks.entry(*sequence).or_default().push(*attempt);
    }
    let all: BTreeSet<u64> = (1..=150).collect();
    let acked: BTreeSet<u64> = acks.keys().copied().collect();
    assert_eq!(
        acked,
        all,
        "every event acked: missing {:?}",
        all.difference(&acked)
    );
    let repeated: Vec<(&u64, &Vec<u32>)> = acks.iter().filter(|(_, a)| a.len() > 1).collect();
    assert!(
        repeated.len() as u64 <= STREAM_ENDS * MAX_IN_FLIGHT,
        "acked twice beyond one window: {repeated:?}"
    );
    assert!(
        repeated
            .iter()
            .all(|(_, attempts)| attempts.iter().any(|&a| a >= 2)),
        "a repeat is a redelivery: {repeated:?}"
    );
    let killed_acked: BTreeSet<u64> = killed.iter().map(|d| d.0).collect();
    let taken_over: Vec<&(u64, u32, String)> = survivor
        .iter()
        .filter(|(s, attempt, _)| *attempt >= 2 && !killed_acked.contains(s))
        .collect();
    assert!(
        !taken_over.is_empty(),
        "the killed worker held deliveries, and the survivor got them again:\n\
         killed {killed:?}\nsurvivor {survivor:?}"
    );
    eprintln!(
        "trial: killed worker acked {}, survivor {}, taken over {}, acked twice {}",
        killed.len(),
        survivor.len(),
        taken_over.len(),
        repeated.len()
    );
}
