//! `gantry`: one binary for the control plane (`coordinator`), the machines (`agent`), a
//! single-machine setup (`dev`), the training runtime (`train`) and every client command.

mod client;
mod commands;
mod output;

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};
use output::errln;

#[derive(Parser)]
#[command(name = "gantry", version, about = "Schedule deep-learning training jobs on a GPU fleet")]
struct Cli {
    /// The coordinator's gRPC URL (client commands) [default: the one `gantry login` kept, else
    /// http://127.0.0.1:7070].
    #[arg(long, global = true, env = "GANTRY_COORDINATOR")]
    coordinator: Option<String>,
    /// The token client commands send [default: the one `gantry login` kept for this coordinator].
    #[arg(long, global = true, env = "GANTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The CA certificate a coordinator's TLS certificate must chain to (its DATA_DIR/tls/ca.crt)
    /// [default: the one `gantry login` kept for this coordinator].
    #[arg(long, global = true, env = "GANTRY_CA")]
    ca: Option<PathBuf>,
    /// Output format of client commands: `table` for people, `json` for scripts.
    #[arg(short = 'o', long = "output", global = true, default_value = "table", value_parser = ["table", "json"])]
    output: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane.
    Coordinator(Box<commands::server::CoordinatorArgs>),
    /// Run the agent of this machine.
    Agent(commands::server::AgentArgs),
    /// Run a coordinator and one local agent in one process (the single-machine default).
    Dev(commands::server::DevArgs),
    /// Submit a job spec (YAML); prints the job id.
    Submit {
        file: PathBuf,
        /// Stream the job's logs until it ends; exit non-zero unless it succeeded.
        #[arg(long)]
        follow: bool,
    },
    /// List jobs, the queue in order first.
    Jobs,
    /// Describe a job: state, placement, attempts, pending reason.
    Job { id: String },
    /// Cancel a job: queued ones at once, running ones get SIGTERM and a grace period.
    Cancel { id: String },
    /// A job's output, all attempts and ranks, in order.
    Logs {
        id: String,
        /// Keep following until the job ends.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// A job's committed checkpoints.
    Checkpoints { id: String },
    /// Checkpoint operations.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Data sets kept by the coordinator: push a file or folder, list them. Jobs name one as
    /// `dataset://NAME/PATH`; agents cache it.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// The agents of the fleet.
    Nodes,
    /// Every GPU of the fleet, with the job on it.
    Gpus,
    /// Served models (serve jobs): their replicas and where requests go.
    Endpoints,
    /// Serve jobs.
    #[command(subcommand)]
    Serve(ServeCommand),
    /// A live terminal view of the fleet and the queue (q to quit).
    Top,
    /// Stop placing new jobs on a node; its running jobs carry on.
    Drain { node: String },
    /// Let a drained node take new jobs again.
    Undrain { node: String },
    /// Remove a node: its agent's certificate stops working at once, its jobs are requeued.
    RemoveNode { node: String },
    /// Replay a job trace through the scheduler in simulated time: FIFO against gantry's policy.
    Sim(commands::sim::SimArgs),
    /// Tokens: create (the secret is printed once), list, revoke. Admins only.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Check a token against a coordinator and keep both, with --ca's certificate, for later
    /// commands (~/.config/gantry/login.json, readable by you only).
    Login {
        /// The coordinator's gRPC URL.
        url: String,
        #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Print shell completions: `source <(gantry completion bash)`, or save them where the shell
    /// loads completions from.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Run gantry's training runtime in this process (what agents run for `train:` jobs).
    Train {
        /// The `train:` section as JSON.
        #[arg(long)]
        spec: PathBuf,
    },
    /// Serve a trained checkpoint over the Open Inference Protocol (KServe v2, HTTP/JSON) with
    /// dynamic batching on the CPU (what agents run for `serve:` jobs' replicas).
    ServeModel(commands::serve_model::ServeModelArgs),
}

#[derive(Subcommand)]
enum ServeCommand {
    /// Serve model NAME from another checkpoint: its replicas are replaced one at a time, each
    /// new one ready before an old one stops.
    Update {
        name: String,
        /// JOB_ID (its latest checkpoint) or JOB_ID@STEP.
        #[arg(long)]
        from: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token; prints its secret alone on a line, the only time it is shown.
    Create {
        name: String,
        #[arg(long, value_parser = ["admin", "user", "viewer", "agent"])]
        role: String,
        /// How long it is valid, e.g. 30d, 12h [default: until revoked].
        #[arg(long, value_parser = commands::server::duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Every token's name, role and expiry (never the secret).
    List,
    /// Revoke a token: it stops working at once.
    Revoke { name: String },
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// Download a committed checkpoint (the latest unless --step), verifying every file's sha256.
    Download {
        id: String,
        #[arg(long)]
        step: Option<u64>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Upload a file or a folder as the newest version of data set NAME (same bytes: same
    /// version), verified by sha256 on arrival.
    Push { name: String, path: PathBuf },
    /// Every data set, with its newest version.
    #[command(alias = "ls")]
    List,
    /// Delete data set NAME (every version), or one version of it as NAME@VERSION (its sha256
    /// or the start of it), with the files. Refused while a job that has not ended trains on it.
    #[command(alias = "rm")]
    Delete {
        #[arg(value_name = "NAME[@VERSION]")]
        reference: String,
    },
}

/// The exit status when the reader of stdout goes away first (`gantry jobs | head -1`): 128 +
/// SIGPIPE, what a shell reports for a Unix tool that SIGPIPE ended. The command stops at once
/// and quietly; it did not finish, so `submit --follow` and `dev --run` do not claim success.
const STDOUT_CLOSED_EXIT: i32 = 128 + 13;

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) if output::stdout_closed(&e) => STDOUT_CLOSED_EXIT,
        Err(e) => {
            errln!("error: {}", client::one_line(&e));
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let json = cli.output == "json";
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // Only client commands read the login file: a broken one must not stop a coordinator.
    let serves = matches!(
        cli.command,
        Command::Coordinator(_)
            | Command::Agent(_)
            | Command::Dev(_)
            | Command::Sim(_)
            | Command::Completion { .. }
            | Command::Train { .. }
            | Command::ServeModel(_)
            | Command::Login { .. }
    );
    let target = if serves {
        client::Target { urls: String::new(), token: None, ca_pem: None }
    } else {
        client::Target::resolve(cli.coordinator, cli.token, cli.ca.as_deref())?
    };
    let url = &target;
    match cli.command {
        Command::Coordinator(args) => runtime.block_on(commands::server::coordinator(*args)).map(|_| 0),
        Command::Agent(args) => runtime.block_on(commands::server::agent(args)).map(|_| 0),
        Command::Dev(args) => runtime.block_on(commands::server::dev(args)),
        Command::Sim(args) => commands::sim::run(args, json).map(|_| 0),
        Command::Completion { shell } => completion(shell).map(|_| 0),
        Command::Train { spec } => {
            drop(runtime);
            commands::train::run(&spec)
        }
        Command::ServeModel(args) => {
            // It builds a runtime of its own, with `--threads` workers.
            drop(runtime);
            commands::serve_model::run(args)
        }
        Command::Submit { file, follow } => runtime.block_on(commands::jobs::submit(url, &file, follow, json)),
        Command::Jobs => runtime.block_on(commands::jobs::list(url, json)).map(|_| 0),
        Command::Job { id } => runtime.block_on(commands::jobs::describe(url, &id, json)).map(|_| 0),
        Command::Cancel { id } => runtime.block_on(commands::jobs::cancel(url, &id, json)).map(|_| 0),
        Command::Logs { id, follow } => runtime.block_on(commands::jobs::logs(url, &id, follow, json)).map(|_| 0),
        Command::Checkpoints { id } => runtime.block_on(commands::checkpoints::list(url, &id, json)).map(|_| 0),
        Command::Checkpoint(CheckpointCommand::Download { id, step, out }) => {
            runtime.block_on(commands::checkpoints::download(url, &id, step, &out, json)).map(|_| 0)
        }
        Command::Dataset(DatasetCommand::Push { name, path }) => {
            runtime.block_on(commands::datasets::push(url, &name, &path, json)).map(|_| 0)
        }
        Command::Dataset(DatasetCommand::List) => runtime.block_on(commands::datasets::list(url, json)).map(|_| 0),
        Command::Dataset(DatasetCommand::Delete { reference }) => {
            runtime.block_on(commands::datasets::delete(url, &reference, json)).map(|_| 0)
        }
        Command::Nodes => runtime.block_on(commands::fleet::nodes(url, json)).map(|_| 0),
        Command::Gpus => runtime.block_on(commands::fleet::gpus(url, json)).map(|_| 0),
        Command::Endpoints => runtime.block_on(commands::endpoints::list(url, json)).map(|_| 0),
        Command::Serve(ServeCommand::Update { name, from }) => {
            runtime.block_on(commands::endpoints::update(url, &name, &from, json)).map(|_| 0)
        }
        Command::Top => commands::top::run(url, &runtime).map(|_| 0),
        Command::Drain { node } => runtime.block_on(commands::fleet::drain(url, &node, true, json)).map(|_| 0),
        Command::Undrain { node } => runtime.block_on(commands::fleet::drain(url, &node, false, json)).map(|_| 0),
        Command::RemoveNode { node } => runtime.block_on(commands::fleet::remove(url, &node, json)).map(|_| 0),
        Command::Token(TokenCommand::Create { name, role, ttl }) => {
            runtime.block_on(commands::access::create(url, &name, &role, ttl, json)).map(|_| 0)
        }
        Command::Token(TokenCommand::List) => runtime.block_on(commands::access::list(url, json)).map(|_| 0),
        Command::Token(TokenCommand::Revoke { name }) => {
            runtime.block_on(commands::access::revoke(url, &name, json)).map(|_| 0)
        }
        Command::Login { url, token } => {
            runtime.block_on(commands::access::login(&url, &token, cli.ca.as_deref(), json)).map(|_| 0)
        }
    }
}

/// Writes the script to a buffer first: clap_complete panics on a failed write, and a closed
/// stdout must end the command quietly (see [`output::Stdout`]).
fn completion(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "gantry", &mut script);
    output::Stdout.write_all(&script)?;
    Ok(())
}
