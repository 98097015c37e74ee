//! `moltghost`: the command line for the MoltGhost edge (a client of its admin API), and
//! `moltghost dev`, the whole local stack in one command.

mod client;
mod dev;
mod top;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use client::{seg, Admin, Failure};
use serde_json::{json, Value};

/// Manage MoltGhost agents, API keys and accounts, or run the local stack.
///
/// Quick start:
///   moltghost dev                                   # edge + runtime + agent + key, on loopback
///   moltghost status demo --url                     # the agent's endpoint
///   moltghost auth create-key --agent demo --name "Production API"
///   moltghost auth list-keys
///   moltghost auth revoke-key molti_abc123_xyz789   # or the key id, key_...
///   moltghost agent pause demo && moltghost agent start demo
///   moltghost usage --by key                        # tokens this month, per key
///   moltghost top                                   # live: requests, latency, streams, tunnels
///
/// The admin API is found from --admin-url/--token, then MOLTGHOST_ADMIN_URL and
/// MOLTGHOST_ADMIN_TOKEN, then the file that `moltghost dev` writes in the data directory.
///
/// Exit codes: 0 success, 1 refused by the API (bad input, not found, conflict), 2 usage error,
/// 3 the admin API could not be reached or used.
#[derive(Parser)]
#[command(name = "moltghost", version, verbatim_doc_comment)]
struct Cli {
    /// Admin API URL, e.g. http://127.0.0.1:9901.
    #[arg(long, global = true, env = "MOLTGHOST_ADMIN_URL")]
    admin_url: Option<String>,
    /// Admin token (a JWT; see `moltghost token`).
    #[arg(
        long,
        global = true,
        env = "MOLTGHOST_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Data directory of the local stack.
    #[arg(
        long,
        global = true,
        default_value = ".moltghost",
        env = "MOLTGHOST_DATA_DIR"
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole local stack: edge, reference runtime, agent `demo` and a key.
    Dev(dev::DevArgs),
    /// Show an agent (by name or endpoint id), with its tunnel; --url prints just its endpoint.
    /// Without an agent: the edge (store, counts, its WireGuard public key, every pod's tunnel).
    Status {
        /// Agent name or endpoint id.
        agent: Option<String>,
        /// Print only the endpoint URL.
        #[arg(long)]
        url: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// API keys.
    #[command(subcommand)]
    Auth(AuthCmd),
    /// Agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Accounts.
    #[command(subcommand)]
    Account(AccountCmd),
    /// Plans (declared in the edge's config).
    #[command(subcommand)]
    Plan(PlanCmd),
    /// Token usage this month (or --month), per account, key or agent; or, with --request,
    /// what one request was billed, by the x-request-id its client was given.
    Usage {
        /// The x-request-id of one request: its ledger rows and total.
        #[arg(long, conflicts_with_all = ["account", "month"])]
        request: Option<String>,
        /// Only this account (name or id).
        #[arg(long)]
        account: Option<String>,
        /// YYYY-MM (UTC); this month when absent.
        #[arg(long)]
        month: Option<String>,
        /// Group by account, key or agent.
        #[arg(long, default_value = "account", value_parser = ["account", "key", "agent"])]
        by: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A live view of an edge or a fleet: requests and errors per second, the latency the edge
    /// adds (p50, p99), open streams, the busiest agents and keys, tunnels. `q` or Ctrl-C quits.
    ///   moltghost top
    ///   moltghost top --edge http://edge-2.internal:9901 --edge http://edge-3.internal:9901   # a fleet
    #[command(verbatim_doc_comment)]
    Top(top::TopArgs),
    /// Mint an admin token from the admin secret (MOLTGHOST_ADMIN_SECRET or the data directory).
    Token {
        /// `read` or `write`.
        #[arg(long, default_value = "write")]
        scope: String,
        /// Lifetime, e.g. 1h, 30d.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Who the token is for.
        #[arg(long, default_value = "operator")]
        subject: String,
    },
}

#[derive(Subcommand)]
enum AuthCmd {
    /// Create a key; prints the key alone (it is shown only once).
    CreateKey {
        /// Agent(s) the key may call (name or endpoint id); none: every agent of the account.
        #[arg(long = "agent")]
        agents: Vec<String>,
        /// A name for the key.
        #[arg(long)]
        name: String,
        /// Account (when no agent is given and there are several).
        #[arg(long)]
        account: Option<String>,
        /// Expire after this long, e.g. 30d.
        #[arg(long)]
        expires_in: Option<String>,
        /// Print JSON (includes the key).
        #[arg(long)]
        json: bool,
    },
    /// List keys (never the keys themselves).
    ListKeys {
        /// Only this account's.
        #[arg(long)]
        account: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key, given the key or its id. Safe for rotation: create the new one first.
    RevokeKey {
        /// The key (molti_...) or its id (key_...).
        key: String,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Register an agent.
    Create {
        /// Unique name.
        name: String,
        /// Where its runtime is, reached directly: http://host:port (development).
        #[arg(long, required_unless_present = "pod", conflicts_with = "pod")]
        upstream: Option<String>,
        /// Its pod, reached through WireGuard: <public key>@<host:port>, the key as
        /// `moltghost-pod keygen` printed it.
        #[arg(long)]
        pod: Option<String>,
        /// Owning account (name or id).
        #[arg(long)]
        account: Option<String>,
        /// Endpoint id (random when absent).
        #[arg(long)]
        id: Option<String>,
        /// Initial state.
        #[arg(long, default_value = "running")]
        state: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start (or resume) an agent.
    Start(AgentRef),
    /// Pause an agent: its endpoint answers 503 until started.
    Pause(AgentRef),
    /// Terminate an agent: its endpoint answers 410 for good.
    Terminate(AgentRef),
    /// Change an agent's upstream.
    SetUpstream {
        /// Agent name or endpoint id.
        agent: String,
        /// New upstream: http://host:port, or wg://<public key>@<host:port> for a pod.
        upstream: String,
    },
    /// List agents.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct AgentRef {
    /// Agent name or endpoint id.
    agent: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum AccountCmd {
    /// Create an account.
    Create {
        /// Unique name.
        name: String,
        /// Plan (see `moltghost plan list`).
        #[arg(long)]
        plan: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List accounts.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move an account to another plan.
    SetPlan {
        /// Account name or id.
        account: String,
        /// Plan name.
        plan: String,
    },
}

#[derive(Subcommand)]
enum PlanCmd {
    /// List plans.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Prints rows as aligned columns under a header.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        line(r);
    }
}

/// Prints the array under `list` in `v` as a table, one row per item.
fn print_table(v: &Value, list: &str, header: &[&str], row: impl Fn(&Value) -> Vec<String>) {
    table(
        header,
        v[list].as_array().into_iter().flatten().map(row).collect(),
    );
}

fn text(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) if a.is_empty() => "(all)".into(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

fn when(v: &Value, k: &str) -> String {
    v[k].as_i64().map_or("-".into(), |t| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64),
        )
        .to_string()
    })
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON prints"));
}

fn seconds(s: &str) -> Result<i64, Failure> {
    humantime::parse_duration(s)
        .map(|d| d.as_secs() as i64)
        .map_err(|e| Failure::Refused(format!("invalid duration {s:?}: {e}")))
}

fn print_agent(a: &Value, json_out: bool) {
    if json_out {
        print_json(a);
    } else {
        println!(
            "{} ({}) {} -> {}\n  {}",
            text(a, "name"),
            text(a, "endpoint_id"),
            text(a, "state"),
            text(a, "upstream"),
            text(a, "url")
        );
        if let Some(t) = a.get("tunnel") {
            let ago = t["last_handshake_seconds_ago"]
                .as_f64()
                .map_or("never".to_string(), |s| format!("{s:.1} s ago"));
            println!(
                "  tunnel {}: last handshake {ago}, {} packets in, {} out, loss {:.1}%, endpoint {}",
                if t["up"].as_bool() == Some(true) { "up" } else { "down" },
                t["rx_packets"],
                t["tx_packets"],
                t["loss"].as_f64().unwrap_or(0.0) * 100.0,
                text(t, "endpoint"),
            );
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let admin = || Admin::locate(cli.admin_url.clone(), cli.token.clone(), &cli.data_dir);
    match cli.command {
        Command::Dev(args) => dev::run(args, &cli.data_dir).await,
        Command::Top(args) => top::run(args, admin()?, cli.token.clone()).await,
        Command::Token {
            scope,
            ttl,
            subject,
        } => token(&cli.data_dir, scope, ttl, subject),
        Command::Status {
            agent,
            url,
            json: json_out,
        } => status(admin()?, agent, url, json_out).await,
        Command::Auth(cmd) => auth(admin()?, cmd).await,
        Command::Usage {
            request: Some(id),
            json: json_out,
            ..
        } => usage_of_request(admin()?, &id, json_out).await,
        Command::Usage {
            request: None,
            account,
            month,
            by,
            json: json_out,
        } => usage(admin()?, account, month, by, json_out).await,
        Command::Agent(cmd) => agent(admin()?, cmd).await,
        Command::Account(cmd) => account(admin()?, cmd).await,
        Command::Plan(PlanCmd::List { json: json_out }) => plans(admin()?, json_out).await,
    }
}

/// `moltghost token`: an admin token minted with this data directory's admin secret.
fn token(
    data_dir: &std::path::Path,
    scope: String,
    ttl: String,
    subject: String,
) -> Result<(), Failure> {
    let secret = moltghost_common::secrets::load_or_create(
        None,
        "MOLTGHOST_ADMIN_SECRET",
        data_dir,
        "admin_secret",
    )
    .map_err(|e| Failure::Unreachable(format!("admin secret: {e}")))?;
    if !matches!(scope.as_str(), "read" | "write") {
        return Err(Failure::Refused("--scope is read or write".into()));
    }
    let token =
        moltghost_common::admin_token::mint_token(&secret, &subject, &scope, seconds(&ttl)?)
            .map_err(Failure::Unreachable)?;
    println!("{token}");
    Ok(())
}

/// `moltghost status [AGENT]`: the edge, or one agent.
async fn status(
    admin: Admin,
    agent: Option<String>,
    url: bool,
    json_out: bool,
) -> Result<(), Failure> {
    let Some(agent) = agent else {
        let st = admin.get("/v1/admin/status").await?;
        if json_out {
            print_json(&st);
        } else {
            println!(
                "store {} ({}), {} agents, {} accounts, {} live keys\nWireGuard public key {}",
                text(&st["store"], "backend"),
                if st["store"]["healthy"].as_bool() == Some(true) {
                    "healthy"
                } else {
                    "unreachable"
                },
                st["agents"],
                st["accounts"],
                st["live_keys"],
                text(&st["tunnel"], "public_key")
            );
            for p in st["tunnel"]["pods"].as_array().into_iter().flatten() {
                let up = p["tunnel"]["up"].as_bool() == Some(true);
                println!(
                    "  {} ({}) {} tunnel {}",
                    text(p, "name"),
                    text(p, "agent"),
                    text(p, "pod"),
                    if up { "up" } else { "down" }
                );
            }
        }
        return Ok(());
    };
    let a = admin
        .get(&format!("/v1/admin/agents/{}", seg(&agent)))
        .await?;
    if url {
        println!("{}", text(&a, "url"));
    } else {
        print_agent(&a, json_out);
    }
    Ok(())
}

/// `moltghost auth ...`: create, list and revoke keys.
async fn auth(admin: Admin, cmd: AuthCmd) -> Result<(), Failure> {
    match cmd {
        AuthCmd::CreateKey {
            agents,
            name,
            account,
            expires_in,
            json: json_out,
        } => {
            let mut body = json!({"name": name, "agents": agents});
            if let Some(a) = account {
                body["account"] = json!(a);
            }
            if let Some(e) = expires_in {
                body["expires_in_seconds"] = json!(seconds(&e)?);
            }
            let k = admin.post("/v1/admin/keys", body).await?;
            if json_out {
                print_json(&k);
            } else {
                println!("{}", text(&k, "key"));
            }
            Ok(())
        }
        AuthCmd::ListKeys {
            account,
            json: json_out,
        } => {
            let path = match account {
                Some(a) => format!("/v1/admin/keys?account={}", seg(&a)),
                None => "/v1/admin/keys".into(),
            };
            let v = admin.get(&path).await?;
            if json_out {
                print_json(&v);
                return Ok(());
            }
            print_table(
                &v,
                "keys",
                &[
                    "ID",
                    "NAME",
                    "KEY",
                    "AGENTS",
                    "CREATED",
                    "LAST USED",
                    "STATUS",
                ],
                |k| {
                    let status = if !k["revoked_at"].is_null() {
                        "revoked"
                    } else {
                        "active"
                    };
                    vec![
                        text(k, "id"),
                        text(k, "name"),
                        text(k, "prefix"),
                        text(k, "agents"),
                        when(k, "created_at"),
                        when(k, "last_used_at"),
                        status.into(),
                    ]
                },
            );
            Ok(())
        }
        AuthCmd::RevokeKey { key } => {
            let body = if key.starts_with(moltghost_protocol::keys::KEY_PREFIX) {
                json!({"key": key})
            } else {
                json!({"id": key})
            };
            let v = admin.post("/v1/admin/keys/revoke", body).await?;
            println!("revoked {}", text(&v, "id"));
            Ok(())
        }
    }
}

/// `moltghost usage --request <id>`: what the request the client knows by `id` was billed.
async fn usage_of_request(admin: Admin, id: &str, json_out: bool) -> Result<(), Failure> {
    let v = admin
        .get(&format!("/v1/admin/usage/requests/{}", seg(id)))
        .await?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    if v["billed"] != json!(true) {
        println!("request {id}: not billed (no tokens used, or its edge has not shipped it yet)");
        return Ok(());
    }
    println!("request {id}: billed {} tokens", text(&v, "total_tokens"));
    print_table(
        &v,
        "rows",
        &[
            "ACCOUNT",
            "KEY",
            "AGENT",
            "PROMPT",
            "COMPLETION",
            "TOTAL",
            "ESTIMATED",
            "OUTCOME",
            "EDGE",
        ],
        |r| {
            vec![
                text(r, "account_id"),
                text(r, "key_id"),
                text(r, "agent_id"),
                text(r, "prompt_tokens"),
                text(r, "completion_tokens"),
                text(r, "total_tokens"),
                text(r, "estimated"),
                text(r, "outcome"),
                text(r, "edge_id"),
            ]
        },
    );
    Ok(())
}

/// `moltghost usage`: the month's tokens by key, agent or account.
async fn usage(
    admin: Admin,
    account: Option<String>,
    month: Option<String>,
    by: String,
    json_out: bool,
) -> Result<(), Failure> {
    let mut path = format!("/v1/admin/usage?by={by}");
    if let Some(a) = account {
        path += &format!("&account={}", seg(&a));
    }
    if let Some(m) = month {
        path += &format!("&month={}", seg(&m));
    }
    let v = admin.get(&path).await?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    println!("usage in {} (UTC), by {by}", text(&v, "month"));
    print_table(
        &v,
        "usage",
        &[
            "ACCOUNT",
            by.to_uppercase().as_str(),
            "REQUESTS",
            "PROMPT",
            "COMPLETION",
            "TOTAL",
            "ESTIMATED",
        ],
        |l| {
            vec![
                text(l, "account_id"),
                text(l, "group"),
                text(l, "requests"),
                text(l, "prompt_tokens"),
                text(l, "completion_tokens"),
                text(l, "total_tokens"),
                text(l, "estimated_requests"),
            ]
        },
    );
    if let Some(accounts) = v["accounts"].as_object() {
        for (id, a) in accounts {
            println!(
                "{id} ({}): {} of {} tokens this month",
                text(a, "name"),
                text(a, "used"),
                text(a, "tokens_per_month")
            );
        }
    }
    Ok(())
}

/// `moltghost plan list`.
async fn plans(admin: Admin, json_out: bool) -> Result<(), Failure> {
    let v = admin.get("/v1/admin/plans").await?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    print_table(
        &v,
        "plans",
        &["PLAN", "REQUESTS/MIN", "TOKENS/MONTH", "STREAMS"],
        |p| {
            vec![
                text(p, "name"),
                text(p, "requests_per_minute"),
                text(p, "tokens_per_month"),
                text(p, "concurrent_streams"),
            ]
        },
    );
    Ok(())
}

async fn agent(admin: Admin, cmd: AgentCmd) -> Result<(), Failure> {
    let (r, action, json_out) = match cmd {
        AgentCmd::Create {
            name,
            upstream,
            pod,
            account,
            id,
            state,
            json: json_out,
        } => {
            let upstream = match (upstream, pod) {
                (Some(u), _) => u,
                (None, Some(p)) => format!("wg://{p}"),
                (None, None) => unreachable!("clap requires one"),
            };
            let mut body = json!({"name": name, "upstream": upstream, "state": state});
            if let Some(a) = account {
                body["account"] = json!(a);
            }
            if let Some(i) = id {
                body["endpoint_id"] = json!(i);
            }
            print_agent(&admin.post("/v1/admin/agents", body).await?, json_out);
            return Ok(());
        }
        AgentCmd::List { json: json_out } => {
            let v = admin.get("/v1/admin/agents").await?;
            if json_out {
                print_json(&v);
                return Ok(());
            }
            print_table(
                &v,
                "agents",
                &["NAME", "ENDPOINT", "STATE", "UPSTREAM", "URL"],
                |a| {
                    vec![
                        text(a, "name"),
                        text(a, "endpoint_id"),
                        text(a, "state"),
                        text(a, "upstream"),
                        text(a, "url"),
                    ]
                },
            );
            return Ok(());
        }
        AgentCmd::SetUpstream { agent, upstream } => {
            let a = admin
                .patch(
                    &format!("/v1/admin/agents/{}", seg(&agent)),
                    json!({"upstream": upstream}),
                )
                .await?;
            print_agent(&a, false);
            return Ok(());
        }
        AgentCmd::Start(a) => (a.agent, "start", a.json),
        AgentCmd::Pause(a) => (a.agent, "pause", a.json),
        AgentCmd::Terminate(a) => (a.agent, "terminate", a.json),
    };
    let a = admin
        .post(&format!("/v1/admin/agents/{}/{action}", seg(&r)), json!({}))
        .await?;
    print_agent(&a, json_out);
    Ok(())
}

async fn account(admin: Admin, cmd: AccountCmd) -> Result<(), Failure> {
    match cmd {
        AccountCmd::Create {
            name,
            plan,
            json: json_out,
        } => {
            let mut body = json!({"name": name});
            if let Some(p) = plan {
                body["plan"] = json!(p);
            }
            let a = admin.post("/v1/admin/accounts", body).await?;
            if json_out {
                print_json(&a);
            } else {
                println!(
                    "{} ({}) on plan {}",
                    text(&a, "name"),
                    text(&a, "id"),
                    text(&a, "plan")
                );
            }
        }
        AccountCmd::List { json: json_out } => {
            let v = admin.get("/v1/admin/accounts").await?;
            if json_out {
                print_json(&v);
                return Ok(());
            }
            print_table(&v, "accounts", &["NAME", "ID", "PLAN", "CREATED"], |a| {
                vec![
                    text(a, "name"),
                    text(a, "id"),
                    text(a, "plan"),
                    when(a, "created_at"),
                ]
            });
        }
        AccountCmd::SetPlan { account, plan } => {
            let a = admin
                .patch(
                    &format!("/v1/admin/accounts/{}", seg(&account)),
                    json!({"plan": plan}),
                )
                .await?;
            println!("{} is on plan {}", text(&a, "name"), text(&a, "plan"));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moltghost: {e}");
            ExitCode::from(e.code())
        }
    }
}
