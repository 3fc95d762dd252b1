//! Uploads a meal photo through the gateway's `SpikeRecords/UploadNutritionImage`.
//!
//! ```text
//! cargo run --example upload_nutrition -- --user user-1 meal.jpg --await-result --timeout 60s
//! cargo run --example upload_nutrition -- --user user-1 meal.jpg --field energy_kcal --field protein_g
//! ```

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use spike_gateway::proto::{UploadNutritionImageRequest, spike_records_client::SpikeRecordsClient};
use tonic::{Request, metadata::MetadataValue};

#[derive(Parser)]
struct Args {
    /// Gateway gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Spike application_user_id the meal belongs to.
    #[arg(long)]
    user: String,
    /// Answer only once Spike has analysed the image (delivered by its webhook).
    #[arg(long)]
    await_result: bool,
    /// A nutritional field key to report, e.g. energy_kcal (repeatable). None: Spike's
    /// default carbohydrate_g, energy_kcal, fat_total_g and protein_g.
    #[arg(long = "field")]
    fields: Vec<String>,
    /// The call's deadline.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Bearer token, when the gateway has GATEWAY_GRPC_TOKENS.
    #[arg(long, env = "GATEWAY_GRPC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The image file.
    image: PathBuf,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let image = std::fs::read(&args.image).map_err(|e| format!("{}: {e}", args.image.display()))?;
    let mut request = Request::new(UploadNutritionImageRequest {
        application_user_id: args.user,
        image,
        include_ingredients: Some(true),
        include_nutri_score: Some(true),
        include_nutrition_fields: args.fields,
        await_result: args.await_result,
        ..Default::default()
    });
    request.set_timeout(args.timeout);
    if let Some(token) = &args.token {
        let value: MetadataValue<_> = format!("Bearer {token}").parse()?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut client = SpikeRecordsClient::connect(args.addr)
        .await?
        .max_encoding_message_size(16 * 1024 * 1024);
    match client.upload_nutrition_image(request).await {
        Ok(result) => {
            let record = result.into_inner();
            println!("record {} is {:?}", record.record_id, record.status());
            if !record.dish_name.is_empty() {
                println!(
                    "dish: {} (nutri-score {})",
                    record.dish_name, record.nutri_score
                );
            }
            for (nutrient, amount) in &record.nutritional_fields {
                println!("  {nutrient}: {amount}");
            }
            if !record.failure_reason.is_empty() {
                println!("failed: {}", record.failure_reason);
            }
            Ok(())
        }
        Err(status) => {
            eprintln!("{:?}: {}", status.code(), status.message());
            std::process::exit(1);
        }
    }
}
