//! The fixed-count closed-loop loader and the server CPU it is judged by.
//!
//! The loader speaks HTTP/1.1 over raw keep-alive sockets with every request pre-built and
//! pre-signed before the clock starts: on a 2-core machine every microsecond the loader
//! spends comes out of the server's budget, so it does as little as a client can.
//! Server CPU is read from `/proc/<pid>` of the server process (a child of this one), so
//! the loader's own CPU never counts in the server's figure.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};

/// CPU seconds (utime + stime) of a process: in total, and per thread name.
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    /// The whole process, exited threads included (`/proc/<pid>/stat`).
    pub total: f64,
    /// Live threads by name (`comm`, which Linux cuts to 15 bytes).
    pub threads: BTreeMap<String, f64>,
}

/// Clock ticks per second of `/proc`'s utime and stime (`getconf CLK_TCK`; 100 on Linux).
fn ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// (comm, utime + stime in seconds) from a `stat` file's text.
fn parse_stat(text: &str) -> Option<(String, f64)> {
    // comm is in parentheses and may itself hold spaces or parentheses: split at the last.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // After comm: state is field 3 of stat(5), so utime (14) and stime (15) are 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) / ticks_per_second()))
}

impl Cpu {
    pub fn of(pid: u32) -> Self {
        let read = |path: String| std::fs::read_to_string(path).ok();
        let total = read(format!("/proc/{pid}/stat"))
            .and_then(|t| parse_stat(&t))
            .map_or(0.0, |(_, s)| s);
        let mut threads = BTreeMap::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let stat = read(format!("{}/stat", task.path().display()));
                if let Some((comm, seconds)) = stat.and_then(|t| parse_stat(&t)) {
                    *threads.entry(comm).or_insert(0.0) += seconds;
                }
            }
        }
        Self { total, threads }
    }

    /// CPU spent between `earlier` and `self`.
    pub fn since(&self, earlier: &Cpu) -> Cpu {
        let threads = self
            .threads
            .iter()
            .map(|(name, s)| (name.clone(), s - earlier.threads.get(name).unwrap_or(&0.0)))
            .filter(|(_, s)| *s > 0.0)
            .collect();
        Cpu {
            total: self.total - earlier.total,
            threads,
        }
    }

    /// `name 12.3 µs, ...`: each thread name's CPU per `count` units of work.
    pub fn per_thread(&self, count: u64) -> String {
        self.threads
            .iter()
            .map(|(name, s)| format!("{name} {:.1}", s * 1e6 / count as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One pre-built HTTP/1.1 POST of a signed webhook body.
pub fn request(path: &str, (body, signature): (Vec<u8>, String)) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\nx-body-signature: {signature}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request
}

/// What one loader run measured.
pub struct Load {
    pub acknowledged: u64,
    pub seconds: f64,
    pub cpu: Cpu,
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.acknowledged as f64 / self.seconds
    }

    /// Server CPU per acknowledged request, in µs.
    pub fn cpu_us(&self) -> f64 {
        self.cpu.total * 1e6 / self.acknowledged.max(1) as f64
    }
}

/// Sends every request in `requests` once over `connections` keep-alive connections, each
/// connection sending its next request when the previous one is answered (closed loop), and
/// reads the server's CPU (process `pid`) over exactly that span.
pub async fn closed_loop(
    addr: std::net::SocketAddr,
    pid: u32,
    requests: Vec<Vec<u8>>,
    connections: usize,
) -> Load {
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let mut streams = Vec::new();
    for _ in 0..connections {
        let stream = TcpStream::connect(addr).await.expect("server accepts");
        stream.set_nodelay(true).unwrap();
        streams.push(stream);
    }
    let before = Cpu::of(pid);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for mut stream in streams {
        let (requests, next, acknowledged) = (requests.clone(), next.clone(), acknowledged.clone());
        tasks.spawn(async move {
            let mut buffer = Vec::with_capacity(4096);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(request) = requests.get(n) else {
                    return;
                };
                stream.write_all(request).await.expect("server reads");
                if read_response(&mut stream, &mut buffer).await == 200 {
                    acknowledged.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    Load {
        acknowledged: acknowledged.load(Ordering::Relaxed),
        seconds,
        cpu: Cpu::of(pid).since(&before),
    }
}

/// Reads one response (head and `content-length` body) and returns its status.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> u16 {
    buffer.clear();
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..end]).expect("ASCII head");
            let status = head[9..12].parse().expect("a status code");
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            let whole = end + 4 + length;
            while buffer.len() < whole {
                read_more(stream, buffer).await;
            }
            return status;
        }
        read_more(stream, buffer).await;
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk))
        .await
        .expect("the server answers within 30 s")
        .expect("the connection stays open");
    assert!(read > 0, "the server closed a keep-alive connection");
    buffer.extend_from_slice(&chunk[..read]);
}

/// `median [min–max]` of a figure over runs.
pub fn spread(values: &[f64], precision: usize) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    format!(
        "{:.p$} [{:.p$}–{:.p$}]",
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1],
        p = precision
    )
}

/// The machine's CPU model, as `/proc/cpuinfo` names it.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The machine's CPU time as `/proc/stat`'s first line counts it: all of it and the part
/// the hypervisor gave to other guests (steal). On a shared VM, steal is why one run's
/// figures can be half another's; each section prints it so a reader can tell.
#[derive(Clone, Copy)]
pub struct MachineTime {
    total: u64,
    steal: u64,
}

impl MachineTime {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu user nice system idle iowait irq softirq steal guest guest_nice
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|f| f.parse().ok())
            .collect();
        Self {
            total: fields.iter().sum(),
            steal: fields.get(7).copied().unwrap_or(0),
        }
    }

    /// Percent of the machine's time since `earlier` that was stolen.
    pub fn steal_percent_since(&self, earlier: &MachineTime) -> f64 {
        let total = self.total.saturating_sub(earlier.total).max(1);
        100.0 * self.steal.saturating_sub(earlier.steal) as f64 / total as f64
    }
}
