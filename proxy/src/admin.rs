//! The admin API: HTTP/JSON on its own listener, every call but health and the JWKS behind a
//! bearer JWT (HS256, `exp` required, scope `read` or `write`). The `moltghost` CLI is its
//! client. Errors use the edge's one error type and JSON shape.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jsonwebtoken::{DecodingKey, Validation};
use pingora_core::server::ShutdownWatch;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::is_label;
use crate::control::Control;
use crate::error::EdgeError;
use crate::registry::AgentState;
use crate::store::{self, AccountRow, AgentRow, KeyRow, Store, StoreError, UsageBy};
use crate::upstream::UpstreamTarget;

pub use moltghost_common::admin_token::{mint_token, AdminClaims};

struct ApiError(EdgeError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::BAD_REQUEST);
        let mut resp = (status, Json(self.0.to_json())).into_response();
        for (k, v) in self.0.headers() {
            if let Ok(v) = v.parse() {
                resp.headers_mut().insert(k, v);
            }
        }
        resp
    }
}

impl From<EdgeError> for ApiError {
    fn from(e: EdgeError) -> Self {
        Self(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self(match e {
            StoreError::NotFound(what) => EdgeError::NotFound(format!("{what} not found").into()),
            StoreError::Conflict(m) => EdgeError::Conflict(m.into()),
            other => {
                tracing::error!(error = %other, "admin API: store failure");
                EdgeError::UpstreamUnavailable("the store is unavailable; retry".into())
            }
        })
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        Self(EdgeError::InvalidRequest(e.body_text().into()))
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn invalid(m: impl Into<String>) -> ApiError {
    ApiError(EdgeError::InvalidRequest(m.into().into()))
}

#[derive(Clone)]
struct AppState {
    control: Arc<Control>,
    store: Store,
}

impl AppState {
    /// Brings this edge's snapshot up to the change just made (other edges hear of it from the
    /// store). The change is committed either way; a failed reload is caught by the watcher.
    async fn changed(&self) {
        if let Err(e) = self.control.refresh(&self.store).await {
            tracing::warn!(error = %e, "snapshot reload after an admin change failed; the watcher retries");
        }
    }
}

/// A caller with a valid token; `WRITE` asks for the write scope.
struct Authorized<const WRITE: bool>;

impl<const WRITE: bool> FromRequestParts<AppState> for Authorized<WRITE> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get("authorization")
            .and_then(|v| crate::keys::bearer(v.as_bytes()))
            .ok_or_else(|| {
                ApiError(EdgeError::Unauthenticated(
                    "an admin token is required: Authorization: Bearer <jwt>".into(),
                ))
            })?;
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        let key = DecodingKey::from_secret(st.control.admin_secret.as_bytes()).map_err(|e| {
            ApiError(EdgeError::Unauthenticated(
                format!("admin secret unusable: {e}").into(),
            ))
        })?;
        let claims = jsonwebtoken::decode::<AdminClaims>(token, &key, &validation)
            .map_err(|e| {
                ApiError(EdgeError::Unauthenticated(
                    format!("invalid admin token: {e}").into(),
                ))
            })?
            .claims;
        match (claims.scope.as_str(), WRITE) {
            ("write", _) | ("read", false) => Ok(Self),
            ("read", true) => Err(ApiError(EdgeError::Forbidden(
                "this call needs a token with the write scope".into(),
            ))),
            (other, _) => Err(ApiError(EdgeError::Forbidden(
                format!("unknown token scope {other:?}").into(),
            ))),
        }
    }
}

type Read = Authorized<false>;
type Write = Authorized<true>;

/// The admin routes.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/admin/health", get(health))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/metrics", get(metrics))
        .route("/v1/admin/status", get(status))
        .route("/v1/admin/plans", get(plans))
        .route(
            "/v1/admin/accounts",
            get(list_accounts).post(create_account),
        )
        .route(
            "/v1/admin/accounts/{account}",
            get(get_account).patch(update_account),
        )
        .route("/v1/admin/agents", get(list_agents).post(create_agent))
        .route(
            "/v1/admin/agents/{agent}",
            get(get_agent).patch(update_agent),
        )
        .route("/v1/admin/agents/{agent}/{action}", post(agent_action))
        .route("/v1/admin/keys", get(list_keys).post(create_key))
        .route("/v1/admin/keys/revoke", post(revoke_key))
        .route("/v1/admin/usage", get(usage))
        .route("/v1/admin/usage/requests/{id}", get(usage_of_request))
        .route("/v1/admin/reload", post(reload))
        .fallback(|| async { ApiError(EdgeError::NotFound("no such admin route".into())) })
        .with_state(state)
}

/// Serves the admin API until shutdown.
pub async fn serve(control: Arc<Control>, store: Store, mut shutdown: ShutdownWatch) {
    let addr = control.cfg().fixed.listen.admin;
    // During an upgrade the old process holds the port until it starts to drain: keep trying.
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                    _ = shutdown.changed() => return,
                }
            }
            Err(e) => {
                tracing::error!(%addr, error = %e, "admin API cannot listen");
                return;
            }
        }
    };
    tracing::info!(%addr, "admin API listening");
    let app = router(AppState { control, store });
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "admin API stopped");
    }
}

async fn health(State(st): State<AppState>) -> Json<Value> {
    let s = st.control.status();
    Json(json!({"status": if s.healthy() { "ok" } else { "degraded" }, "store": store_json(&st)}))
}

fn store_json(st: &AppState) -> Value {
    let s = st.control.status();
    json!({
        "backend": if st.store.is_postgres() { "postgres" } else { "sqlite" },
        "healthy": s.healthy(),
        "stale_seconds": s.stale_for(),
        "generation": st.control.plane.registry.load().generation,
    })
}

/// Prometheus scrape endpoint (unauthenticated, like health: keep the admin listener private).
async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    let s = st.control.status();
    let mut body = st.control.plane.metrics.render(
        s.healthy(),
        s.stale_for(),
        st.control.plane.registry.load().generation,
    );
    body.push_str(&st.control.tunnels.prometheus());
    body.push_str(&st.control.plane.quota.prometheus(crate::store::now()));
    body.push_str(&crate::plugins::prometheus(
        &st.control.plane.plugins.load(),
    ));
    ([("content-type", "text/plain; version=0.0.4")], body)
}

async fn jwks(State(st): State<AppState>) -> Json<Value> {
    Json(st.control.plane.identity.jwks())
}

async fn status(_: Read, State(st): State<AppState>) -> Json<Value> {
    let snap = st.control.plane.registry.load();
    let pods: Vec<Value> = snap
        .agents
        .values()
        .filter_map(|a| {
            let t = a.upstream.tunnel()?;
            Some(json!({"agent": a.endpoint_id, "name": a.name, "pod": a.upstream.target().to_string(), "tunnel": t.link.status()}))
        })
        .collect();
    let tunnel = json!({"public_key": st.control.tunnels.public_key(), "pods": pods});
    Json(
        json!({"store": store_json(&st), "agents": snap.agents.len(), "accounts": snap.accounts.len(), "live_keys": snap.keys.len(), "tunnel": tunnel}),
    )
}

async fn plans(_: Read, State(st): State<AppState>) -> Json<Value> {
    let plans: Vec<Value> = st
        .control
        .cfg()
        .plans
        .iter()
        .map(|p| json!({"name": p.name, "requests_per_minute": p.requests_per_minute, "tokens_per_month": p.tokens_per_month, "concurrent_streams": p.concurrent_streams}))
        .collect();
    Json(json!({"plans": plans}))
}

// ---------------------------------------------------------------------- accounts

async fn find_account(st: &AppState, r: &str) -> ApiResult<AccountRow> {
    st.store
        .accounts()
        .await?
        .into_iter()
        .find(|a| a.id == r || a.name == r)
        .ok_or_else(|| {
            ApiError(EdgeError::NotFound(
                format!("account {r:?} not found").into(),
            ))
        })
}

/// The account a call means: the one named, else the only one there is.
async fn account_or_only(st: &AppState, r: Option<&str>) -> ApiResult<AccountRow> {
    match r {
        Some(r) => find_account(st, r).await,
        None => {
            let mut all = st.store.accounts().await?;
            if all.len() == 1 {
                Ok(all.remove(0))
            } else {
                Err(invalid(
                    "there are several accounts: name one with `account`",
                ))
            }
        }
    }
}

async fn list_accounts(_: Read, State(st): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"accounts": st.store.accounts().await?})))
}

async fn get_account(
    _: Read,
    State(st): State<AppState>,
    Path(r): Path<String>,
) -> ApiResult<Json<AccountRow>> {
    Ok(Json(find_account(&st, &r).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    name: String,
    #[serde(default)]
    plan: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

fn check_plan(st: &AppState, plan: &str) -> ApiResult<()> {
    let cfg = st.control.cfg();
    if cfg.plan(plan).is_none() {
        let names: Vec<_> = cfg.plans.iter().map(|p| p.name.as_str()).collect();
        return Err(invalid(format!(
            "unknown plan {plan:?}; plans: {}",
            names.join(", ")
        )));
    }
    Ok(())
}

async fn create_account(
    _: Write,
    State(st): State<AppState>,
    body: Result<Json<NewAccount>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<AccountRow>)> {
    let Json(n) = body?;
    if !is_label(&n.name) {
        return Err(invalid("`name`: use 1-63 of a-z, 0-9 and -"));
    }
    let plan = n
        .plan
        .unwrap_or_else(|| st.control.cfg().plans[0].name.clone());
    check_plan(&st, &plan)?;
    let id = n.id.unwrap_or_else(|| crate::secrets::short_id(8));
    if !moltghost_protocol::keys::is_account_id(&id) {
        return Err(invalid("`id`: use 1-32 of a-z and 0-9"));
    }
    let row = st
        .store
        .create_account(AccountRow {
            id,
            name: n.name,
            plan,
            created_at: store::now(),
        })
        .await?;
    st.changed().await;
    Ok((StatusCode::CREATED, Json(row)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountUpdate {
    plan: String,
}

async fn update_account(
    _: Write,
    State(st): State<AppState>,
    Path(r): Path<String>,
    body: Result<Json<AccountUpdate>, JsonRejection>,
) -> ApiResult<Json<AccountRow>> {
    let Json(u) = body?;
    check_plan(&st, &u.plan)?;
    let a = find_account(&st, &r).await?;
    st.store.set_account_plan(&a.id, &u.plan).await?;
    st.changed().await;
    Ok(Json(AccountRow { plan: u.plan, ..a }))
}

// ---------------------------------------------------------------------- agents

async fn find_agent(st: &AppState, r: &str) -> ApiResult<AgentRow> {
    st.store
        .agents()
        .await?
        .into_iter()
        .find(|a| a.endpoint_id == r || a.name == r)
        .ok_or_else(|| ApiError(EdgeError::NotFound(format!("agent {r:?} not found").into())))
}

fn agent_json(st: &AppState, a: &AgentRow) -> Value {
    let mut v = serde_json::to_value(a).expect("rows serialize");
    v["url"] = json!(st.control.cfg().endpoint_url(&a.endpoint_id));
    let snap = st.control.plane.registry.load();
    if let Some(t) = snap
        .agents
        .get(&a.endpoint_id)
        .and_then(|a| a.upstream.tunnel())
    {
        v["tunnel"] = json!(t.link.status());
    }
    v
}

async fn list_agents(_: Read, State(st): State<AppState>) -> ApiResult<Json<Value>> {
    let agents: Vec<Value> = st
        .store
        .agents()
        .await?
        .iter()
        .map(|a| agent_json(&st, a))
        .collect();
    Ok(Json(json!({"agents": agents})))
}

async fn get_agent(
    _: Read,
    State(st): State<AppState>,
    Path(r): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(agent_json(&st, &find_agent(&st, &r).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAgent {
    name: String,
    upstream: String,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    endpoint_id: Option<String>,
    #[serde(default)]
    state: Option<String>,
}

async fn create_agent(
    _: Write,
    State(st): State<AppState>,
    body: Result<Json<NewAgent>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(n) = body?;
    if !is_label(&n.name) {
        return Err(invalid("`name`: use 1-63 of a-z, 0-9 and -"));
    }
    let upstream =
        UpstreamTarget::parse(&n.upstream).map_err(|e| invalid(format!("`upstream`: {e}")))?;
    let endpoint_id = n.endpoint_id.unwrap_or_else(|| crate::secrets::short_id(6));
    if !is_label(&endpoint_id) {
        return Err(invalid("`endpoint_id`: use 1-63 of a-z, 0-9 and -"));
    }
    let state: AgentState = n
        .state
        .as_deref()
        .unwrap_or("running")
        .parse()
        .map_err(|e| invalid(format!("`state`: {e}")))?;
    let account = account_or_only(&st, n.account.as_deref()).await?;
    let now = store::now();
    let row = AgentRow {
        endpoint_id,
        name: n.name,
        account_id: account.id,
        upstream: upstream.to_string(),
        state: state.as_str().into(),
        created_at: now,
        updated_at: now,
    };
    let row = st.store.create_agent(row).await?;
    st.changed().await;
    Ok((StatusCode::CREATED, Json(agent_json(&st, &row))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentUpdate {
    upstream: String,
}

async fn update_agent(
    _: Write,
    State(st): State<AppState>,
    Path(r): Path<String>,
    body: Result<Json<AgentUpdate>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(u) = body?;
    let upstream =
        UpstreamTarget::parse(&u.upstream).map_err(|e| invalid(format!("`upstream`: {e}")))?;
    let mut a = find_agent(&st, &r).await?;
    a.upstream = upstream.to_string();
    st.store
        .set_agent_upstream(&a.endpoint_id, &a.upstream)
        .await?;
    st.changed().await;
    Ok(Json(agent_json(&st, &a)))
}

/// The state an action moves an agent to, from `from`.
fn transition(from: AgentState, action: &str) -> Result<AgentState, EdgeError> {
    use AgentState::*;
    let to = match action {
        "start" => Running,
        "pause" => Paused,
        "terminate" => Terminated,
        _ => {
            return Err(EdgeError::NotFound(
                format!("no agent action {action:?}: use start, pause or terminate").into(),
            ))
        }
    };
    if from == Terminated && to != Terminated {
        return Err(EdgeError::Conflict(
            "the agent is terminated; that is final".into(),
        ));
    }
    Ok(to)
}

async fn agent_action(
    _: Write,
    State(st): State<AppState>,
    Path((r, action)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let mut a = find_agent(&st, &r).await?;
    let from: AgentState = a.state.parse().unwrap_or(AgentState::Paused);
    let to = transition(from, &action)?;
    if to != from {
        st.store
            .set_agent_state(&a.endpoint_id, to.as_str())
            .await?;
        st.changed().await;
    }
    a.state = to.as_str().into();
    Ok(Json(agent_json(&st, &a)))
}

// ---------------------------------------------------------------------- keys

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    expires_in_seconds: Option<i64>,
}

async fn create_key(
    _: Write,
    State(st): State<AppState>,
    body: Result<Json<NewKey>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(n) = body?;
    if n.name.trim().is_empty() || n.name.len() > 200 {
        return Err(invalid("`name`: 1-200 characters"));
    }
    if n.expires_in_seconds.is_some_and(|s| s <= 0) {
        return Err(invalid("`expires_in_seconds` must be positive"));
    }
    let mut agents = Vec::new();
    for r in &n.agents {
        agents.push(find_agent(&st, r).await?);
    }
    let account = match (agents.first(), n.account.as_deref()) {
        (Some(a), None) => find_account(&st, &a.account_id).await?,
        (_, r) => account_or_only(&st, r).await?,
    };
    if let Some(other) = agents.iter().find(|a| a.account_id != account.id) {
        return Err(invalid(format!(
            "agent {:?} belongs to another account",
            other.name
        )));
    }
    let key = crate::secrets::new_api_key(&account.id);
    let now = store::now();
    let row = KeyRow {
        id: format!("key_{}", hex::encode(rand::random::<[u8; 6]>())),
        account_id: account.id,
        name: n.name,
        hash: hex::encode(st.control.plane.hasher.hash(&key)),
        prefix: crate::keys::display_prefix(&key),
        agents: agents.iter().map(|a| a.endpoint_id.clone()).collect(),
        created_at: now,
        last_used_at: None,
        expires_at: n.expires_in_seconds.map(|s| now + s),
        revoked_at: None,
    };
    let row = st.store.create_key(row).await?;
    st.changed().await;
    let mut v = serde_json::to_value(&row).expect("rows serialize");
    v["key"] = json!(key);
    Ok((StatusCode::CREATED, Json(v)))
}

#[derive(Deserialize)]
struct KeyFilter {
    account: Option<String>,
}

async fn list_keys(
    _: Read,
    State(st): State<AppState>,
    Query(f): Query<KeyFilter>,
) -> ApiResult<Json<Value>> {
    let account = match f.account.as_deref() {
        Some(r) => Some(find_account(&st, r).await?.id),
        None => None,
    };
    let keys: Vec<KeyRow> = st
        .store
        .keys()
        .await?
        .into_iter()
        .filter(|k| account.as_ref().is_none_or(|a| *a == k.account_id))
        .collect();
    Ok(Json(json!({"keys": keys})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Revoke {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

async fn revoke_key(
    _: Write,
    State(st): State<AppState>,
    body: Result<Json<Revoke>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(r) = body?;
    let target = match (r.key, r.id) {
        (Some(key), None) => hex::encode(st.control.plane.hasher.hash(&key)),
        (None, Some(id)) => id,
        _ => return Err(invalid("give exactly one of `key` or `id`")),
    };
    let id = st.store.revoke_key(&target).await.map_err(|e| match e {
        StoreError::NotFound(_) => ApiError(EdgeError::NotFound("no such key".into())),
        other => other.into(),
    })?;
    st.changed().await;
    Ok(Json(json!({"id": id, "revoked": true})))
}

// ---------------------------------------------------------------------- usage

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    #[serde(default)]
    month: Option<String>,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    by: Option<UsageBy>,
}

async fn usage(
    _: Read,
    State(st): State<AppState>,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(|e| invalid(e.body_text()))?;
    let month = q
        .month
        .unwrap_or_else(|| crate::quota::month_of(store::now()));
    let well_formed = month.len() == 7
        && month.as_bytes()[4] == b'-'
        && month
            .bytes()
            .enumerate()
            .all(|(i, b)| i == 4 || b.is_ascii_digit());
    if !well_formed {
        return Err(invalid("`month` is YYYY-MM"));
    }
    let account = match q.account.as_deref() {
        Some(r) => Some(find_account(&st, r).await?),
        None => None,
    };
    let by = q.by.unwrap_or(UsageBy::Account);
    let lines = st
        .store
        .usage_report(&month, account.as_ref().map(|a| a.id.as_str()), by)
        .await?;
    // Each account's quota beside its use.
    let mut quotas = serde_json::Map::new();
    for a in st.store.accounts().await? {
        if account.as_ref().is_some_and(|x| x.id != a.id) {
            continue;
        }
        let used: u64 = lines
            .iter()
            .filter(|l| l.account_id == a.id)
            .map(|l| l.total_tokens)
            .sum();
        let limit = st.control.cfg().plan(&a.plan).map(|p| p.tokens_per_month);
        quotas.insert(
            a.id.clone(),
            json!({"name": a.name, "plan": a.plan, "tokens_per_month": limit, "used": used}),
        );
    }
    Ok(Json(
        json!({"month": month, "by": by, "usage": lines, "accounts": quotas}),
    ))
}

/// What a request cost, by the id its client was given (`x-request-id`): its ledger rows and
/// their total. `billed` is false when it used no tokens, or its edge has not shipped the row
/// yet (edges ship every `limits.fleet_sync`).
async fn usage_of_request(
    _: Read,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let rows = st.store.usage_of_request(&id).await?;
    let total: u64 = rows.iter().map(|r| r.total_tokens).sum();
    Ok(Json(json!({
        "request_id": id,
        "billed": !rows.is_empty(),
        "total_tokens": total,
        "rows": rows,
    })))
}

// ---------------------------------------------------------------------- reload

/// Reloads the configuration file (as SIGHUP does).
async fn reload(_: Write, State(st): State<AppState>) -> ApiResult<Json<Value>> {
    match st.control.reload(&st.store).await {
        Ok(msg) => Ok(Json(json!({"reloaded": true, "message": msg}))),
        Err(e) => Err(invalid(format!("configuration not reloaded: {e}"))),
    }
}
