//! Signs JSON files as Spike does and posts them to a running gateway.
//!
//! ```text
//! cargo run --example send_webhook                      # every bundled sample
//! cargo run --example send_webhook -- my.json --path /webhooks/spike/lab-reports
//! ```
//! The key comes from `--key` or `SPIKE_WEBHOOK_SIGNATURE_KEY`.

use std::path::PathBuf;

use clap::Parser;
use spike_gateway::webhook::signature::sign;

#[derive(Parser)]
struct Args {
    /// Gateway HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Webhook signature key.
    #[arg(long, env = "SPIKE_WEBHOOK_SIGNATURE_KEY", hide_env_values = true)]
    key: String,
    /// Path to post to; by default chosen from the file name (lab-report-*, nutrition-*,
    /// anything else to the main path).
    #[arg(long)]
    path: Option<String>,
    /// JSON files to post; none = every `*.json` sample in tests/fixtures.
    files: Vec<PathBuf>,
}

fn path_for(file: &std::path::Path) -> &'static str {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name.starts_with("lab-report") {
        "/webhooks/spike/lab-reports"
    } else if name.starts_with("nutrition") {
        "/webhooks/spike/nutrition"
    } else {
        "/webhooks/spike"
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut files = args.files.clone();
    if files.is_empty() {
        let samples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        files = std::fs::read_dir(samples)?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            // Only the samples: the directory also holds a 0.1 data directory (upgrade test).
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        files.sort();
    }
    let client = reqwest::Client::new();
    for file in files {
        let body = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let path = args.path.as_deref().unwrap_or_else(|| path_for(&file));
        let response = client
            .post(format!("{}{path}", args.url.trim_end_matches('/')))
            .header("X-Body-Signature", sign(&args.key, &body))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let answer = response.text().await?;
        println!("{:<45} {path:<30} {status} {answer}", file.display());
    }
    Ok(())
}
