//! `starlight-conformance`: runs conformance suites against a running server.
//!
//! `starlight-conformance oci --url http://127.0.0.1:5000` runs the OCI distribution-spec
//! workflows, prints one row per test and the totals, and exits 1 if any test failed. Flags fall
//! back to the official suite's `OCI_*` environment variables.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use starlight_conformance::oci::{self, ExistingPullContent, OciConfig, Workflows};

#[derive(Debug, Parser)]
#[command(name = "starlight-conformance", version, about = "Conformance suites for Starlight")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the OCI distribution-spec conformance workflows against a registry.
    Oci(OciArgs),
}

#[derive(Debug, Args)]
struct OciArgs {
    /// Registry root URL, e.g. http://127.0.0.1:5000.
    #[arg(long, env = "OCI_ROOT_URL")]
    url: String,
    /// Repository the workflows push to and read from.
    #[arg(long, env = "OCI_NAMESPACE", default_value = "oci-conformance/main")]
    namespace: String,
    /// Repository that cross-repository mounts target.
    #[arg(long, env = "OCI_CROSSMOUNT_NAMESPACE", default_value = "oci-conformance/crossmount")]
    crossmount_namespace: String,
    #[arg(long, env = "OCI_USERNAME")]
    username: Option<String>,
    #[arg(long, env = "OCI_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Scope to ask the token service for instead of the challenge's.
    #[arg(long, env = "OCI_AUTH_SCOPE")]
    auth_scope: Option<String>,
    /// Comma list of pull, push, discovery, management (default: OCI_TEST_* if any is set, else all).
    #[arg(long)]
    workflows: Option<Workflows>,
    /// Delete manifests before blobs in teardowns.
    #[arg(long, env = "OCI_DELETE_MANIFEST_BEFORE_BLOBS", value_parser = parse_bool, default_value = "true")]
    delete_manifest_before_blobs: bool,
    /// Expect a mount without `from` to succeed (true) or open a session (false); unset skips it.
    #[arg(long, env = "OCI_AUTOMATIC_CROSSMOUNT", value_parser = parse_bool)]
    automatic_crossmount: Option<bool>,
    /// With --manifest-digest and --blob-digest: pull this existing content instead of pushing.
    #[arg(long, env = "OCI_TAG_NAME")]
    tag_name: Option<String>,
    #[arg(long, env = "OCI_MANIFEST_DIGEST")]
    manifest_digest: Option<String>,
    #[arg(long, env = "OCI_BLOB_DIGEST")]
    blob_digest: Option<String>,
    /// Tags already in the namespace (comma list); skips the discovery setup.
    #[arg(long, env = "OCI_TAG_LIST", value_delimiter = ',')]
    tag_list: Option<Vec<String>>,
    /// Only check statuses and headers, as the official suite does, not the bytes read back.
    #[arg(long)]
    no_verify_content: bool,
    /// Seconds allowed for each HTTP exchange.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// Seed for the generated content (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Go's `strconv.ParseBool`, which the official suite uses for its variables.
fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("expected a boolean such as 1, 0, true or false, got {s:?}")),
    }
}

/// The official suite's per-workflow switches, if any is set.
fn workflows_from_env() -> Result<Option<Workflows>, String> {
    let vars =
        ["OCI_TEST_PULL", "OCI_TEST_PUSH", "OCI_TEST_CONTENT_DISCOVERY", "OCI_TEST_CONTENT_MANAGEMENT"];
    let mut on = [false; 4];
    let mut any = false;
    for (var, on) in vars.iter().zip(&mut on) {
        if let Ok(v) = std::env::var(var) {
            any = true;
            *on = parse_bool(&v).map_err(|e| format!("{var}: {e}"))?;
        }
    }
    let [pull, push, discovery, management] = on;
    Ok(any.then_some(Workflows { pull, push, discovery, management }))
}

fn config(args: OciArgs) -> Result<OciConfig, String> {
    let workflows = match args.workflows {
        Some(w) => w,
        None => workflows_from_env()?.unwrap_or_else(Workflows::all),
    };
    let existing_pull_content = match (args.tag_name, args.manifest_digest, args.blob_digest) {
        (Some(tag), Some(manifest_digest), Some(blob_digest)) => {
            Some(ExistingPullContent { tag, manifest_digest, blob_digest })
        }
        (None, None, None) => None,
        _ => return Err("--tag-name, --manifest-digest and --blob-digest go together".into()),
    };
    Ok(OciConfig {
        url: args.url,
        namespace: args.namespace,
        crossmount_namespace: args.crossmount_namespace,
        username: args.username,
        password: args.password,
        auth_scope: args.auth_scope,
        workflows,
        delete_manifest_before_blobs: args.delete_manifest_before_blobs,
        automatic_crossmount: args.automatic_crossmount,
        existing_pull_content,
        existing_tags: args.tag_list,
        verify_content: !args.no_verify_content,
        timeout: Duration::from_secs(args.timeout_secs),
        seed: args.seed,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Cmd::Oci(args) = Cli::parse().cmd;
    let json = args.json;
    let config = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("starlight-conformance: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!("OCI conformance against {} (namespace {})", config.url, config.namespace);
    let report = oci::run(&config).await;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    if report.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
