//! A request's walk through the plugins that apply to it: [`PluginRun`], phase by phase in
//! Envoy's order, with pause, buffering and HTTP callouts, and the [`Verdict`] that ends it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::abi::{Action, Headers};
use super::callout::{self, Answer};
use super::grpc_stream::Streams;
use super::host::{Exchange, LocalResponse, Outbox, Phase, Vm};
use super::resume::{self, Resume};
use super::{ticks, with_vm, PluginSet, RequestFacts};

/// How long a request paused with nothing of its own pending waits for another context of its
/// VM to resume it (as long as a call out may take).
const PAUSE_LIMIT: Duration = callout::MAX_TIMEOUT;

/// How a request's run through the plugins ended a phase.
#[derive(Debug)]
pub enum Verdict {
    /// A plugin answered instead of the runtime.
    Respond(LocalResponse),
    /// A fail-closed plugin failed; the message names it (and says nothing of its internals,
    /// which the log has).
    Failed(String),
    /// A plugin reset the stream.
    Reset,
    /// A plugin held back more of the answer than it may buffer (`buffer_kb`).
    BufferFull {
        /// The plugin.
        plugin: String,
        /// Its limit in bytes.
        limit: usize,
    },
}

impl Verdict {
    /// The verdict as the edge's error, from the one table: a fail-closed failure is
    /// `plugin_failed`, a local answer `policy_denied` with the plugin's status and reason.
    pub fn into_error(self) -> crate::error::EdgeError {
        match self {
            Self::Failed(m) => crate::error::EdgeError::PluginFailed(m.into()),
            Self::Reset => crate::error::EdgeError::StreamReset,
            Self::BufferFull { plugin, limit } => {
                crate::error::EdgeError::PluginBufferFull { plugin, limit }
            }
            Self::Respond(local) => crate::error::EdgeError::Denied {
                status: local.status,
                message: if local.details.is_empty() {
                    "Denied by policy".into()
                } else {
                    local.details
                },
            },
        }
    }
}

/// One active plugin's part in a request.
struct Part {
    /// The plugin's index in the set.
    plugin: usize,
    /// Its context (id, VM generation) once created.
    context: Option<(i32, u64)>,
    /// The answer it held back (paused) so far, to be handed to it whole with what follows.
    held: Vec<u8>,
    /// The gRPC streams its contexts opened (they end with the request).
    streams: Option<Streams>,
    /// Time spent in its calls.
    spent: Duration,
}

/// One request's walk through the plugins: contexts in this thread's VMs, the exchange they
/// see, what they decided.
///
/// Pause follows Envoy: a plugin that pauses the request's headers gets the body before the
/// plugins after it see the headers; one that pauses the answer's headers holds them back
/// (the client gets them with the first bytes of the body that pass); one that pauses the
/// answer's body before its end buffers it (up to `buffer_kb`) and gets it whole with the
/// next chunk. A pause is resumed by `proxy_continue_stream` from an HTTP call's callback, by
/// another context of the VM (see [`resume`]), or by the next phase; a plugin that pauses at
/// the end of a stream with nothing that could resume it fails (its fail policy decides).
pub struct PluginRun {
    set: Arc<PluginSet>,
    parts: Vec<Part>,
    exchange: Exchange,
    thread: usize,
    /// The client's `Authorization`, kept out of the exchange but for plugins that may see it.
    authorization: Headers,
    /// A plugin paused the answer's headers: they wait for the body.
    pub holds_header: bool,
    /// The answer keeps its `Content-Length` while plugins see its body: none may change its
    /// length.
    fixed_length: bool,
    /// `plugin:decision` for the access log.
    pub decisions: Vec<String>,
    finished: bool,
}

impl PluginRun {
    /// A run through the plugins of `set` at `active` (indices), for the request `facts`
    /// describe.
    pub(super) fn new(set: Arc<PluginSet>, active: Vec<usize>, facts: RequestFacts) -> Self {
        Self {
            set,
            parts: active
                .into_iter()
                .map(|plugin| Part {
                    plugin,
                    context: None,
                    held: Vec::new(),
                    streams: None,
                    spent: Duration::ZERO,
                })
                .collect(),
            exchange: Exchange {
                facts: Some(Arc::new(facts)),
                ..Exchange::default()
            },
            thread: this_thread(),
            authorization: Vec::new(),
            holds_header: false,
            fixed_length: false,
            decisions: Vec::new(),
            finished: false,
        }
    }

    /// True when some active plugin handles response bodies.
    fn sees_response_body(&self) -> bool {
        self.parts
            .iter()
            .any(|p| self.set.plugins[p.plugin].compiled.sees_response_body)
    }

    /// Runs `f` on plugin `k`'s context in this thread's VM (created on first use), with the
    /// exchange visible; afterwards, what it asked for (calls, streams). A reset or a local
    /// answer ends the walk (`Err`); a failure follows the plugin's fail policy (`Ok(None)`:
    /// skipped).
    fn call<T>(
        &mut self,
        k: usize,
        f: impl FnOnce(&mut Vm, i32, &mut Exchange) -> Result<T, String>,
    ) -> Result<Option<(T, Outbox)>, Verdict> {
        if this_thread() != self.thread {
            // The request moved threads (it should not): its contexts are elsewhere.
            return Ok(None);
        }
        let started = Instant::now();
        // Borrowed from the set, not cloned: an `Arc`'s count is a line both workers share.
        let plugin = &self.set.plugins[self.parts[k].plugin];
        let exchange = &mut self.exchange;
        let shown = plugin.cfg.sees_authorization && !self.authorization.is_empty();
        if shown {
            exchange
                .request_headers
                .extend(self.authorization.iter().cloned());
        }
        let context = &mut self.parts[k].context;
        let mut created = false;
        let outcome = with_vm(plugin, |vm, generation| {
            let id = match *context {
                Some((id, g)) if g == generation => id,
                // Its VM was rebuilt since: the context is gone with it.
                Some(_) => return Err("the plugin's VM was rebuilt mid-request".into()),
                None => {
                    let id = vm.create_context()?;
                    *context = Some((id, generation));
                    created = true;
                    id
                }
            };
            let r = f(vm, id, exchange);
            let mut outbox = vm.take_outbox();
            resume::wake(plugin.uid, generation, std::mem::take(&mut outbox.resumes));
            r.map(|v| (v, outbox))
        });
        if created {
            ticks::start_here(plugin);
        }
        if shown {
            exchange
                .request_headers
                .retain(|(k, _)| k != "authorization");
        }
        self.parts[k].spent += started.elapsed();
        let name = &plugin.cfg.name;
        match outcome {
            Ok(done) => {
                if std::mem::take(&mut self.exchange.reset) {
                    self.decisions.push(format!("{name}:reset"));
                    return Err(Verdict::Reset);
                }
                if let Some(local) = self.exchange.local_response.take() {
                    self.decisions
                        .push(format!("{name}:respond {}", local.status));
                    return Err(Verdict::Respond(local));
                }
                Ok(Some(done))
            }
            Err(e) => self.failed(k, &e),
        }
    }

    /// Plugin `k` failed (`reason`, for the log): skipped when it fails open, else the walk
    /// ends. What went wrong stays in the log, out of the answer.
    fn failed<T>(&mut self, k: usize, reason: &str) -> Result<Option<T>, Verdict> {
        let plugin = &self.set.plugins[self.parts[k].plugin];
        let name = &plugin.cfg.name;
        if let (Some(streams), Some((_, g))) = (self.parts[k].streams.take(), self.parts[k].context)
        {
            // Its streams end here: the VM must not count them.
            on_context_vm(plugin, g, |vm| {
                vm.forget_streams(streams.opened());
                Ok(())
            });
        }
        self.parts[k].context = None;
        if plugin.cfg.fail_open {
            self.decisions.push(format!("{name}:skipped"));
            tracing::debug!(plugin = %name, error = %reason, "plugin skipped (fail open)");
            Ok(None)
        } else {
            self.decisions.push(format!("{name}:failed"));
            Err(Verdict::Failed(format!("policy plugin `{name}` failed")))
        }
    }

    /// Runs `phase` on plugin `k` (after what its gRPC streams brought since its last step),
    /// then makes the calls it asked for and delivers their answers, until none is pending;
    /// while it waits to be resumed (a paused header, or the end of a body), what its streams
    /// bring is delivered as it comes (a minute of silence ends the wait). The plugin's
    /// action: `Continue` when it went on or resumed from a callback.
    async fn step(&mut self, k: usize, phase: Phase, end: bool) -> Result<Action, Verdict> {
        if !self.deliver_ready(k).await? {
            return Ok(Action::Continue);
        }
        let Some((mut action, outbox)) = self.call(k, |vm, id, ex| vm.phase(phase, id, ex, end))?
        else {
            return Ok(Action::Continue);
        };
        self.exchange.continued = false;
        let mut calls = self.open_streams(k, outbox);
        loop {
            if !self.settle(k, std::mem::take(&mut calls)).await? {
                return Ok(Action::Continue);
            }
            if std::mem::take(&mut self.exchange.continued) {
                action = Action::Continue;
            }
            // A body paused before its end is buffered, not waiting to be resumed.
            let waits = action == Action::Pause && (end || phase.is_headers());
            let streams = self.parts[k].streams.as_mut().filter(|s| s.any_open());
            let Some(streams) = streams.filter(|_| waits) else {
                return Ok(action);
            };
            // A stream silent this long while the request waits on it cannot be relied on to
            // resume it: the plugin stalled (its fail policy decides).
            let Ok((token, event)) =
                tokio::time::timeout(callout::MAX_TIMEOUT, streams.next()).await
            else {
                return Ok(action);
            };
            match self.deliver(k, token, Answer::Stream(event))? {
                Some(more) => calls = more,
                None => return Ok(Action::Continue),
            }
        }
    }

    /// Makes `calls` and delivers their answers to plugin `k` (and those of the calls its
    /// callbacks ask for), until none is pending. `false` when the plugin failed open.
    async fn settle(
        &mut self,
        k: usize,
        mut calls: Vec<callout::CallRequest>,
    ) -> Result<bool, Verdict> {
        while !calls.is_empty() {
            let limit = self.set.plugins[self.parts[k].plugin].cfg.buffer_bytes;
            for (token, answer) in callout::perform_all(std::mem::take(&mut calls), limit).await {
                match self.deliver(k, token, answer)? {
                    Some(more) => calls.extend(more),
                    None => return Ok(false),
                }
            }
        }
        Ok(true)
    }

    /// Delivers `answer` to call or stream `token` of plugin `k`: the calls it asks for in
    /// turn (its stream requests carried out), or `None` when the plugin failed open.
    fn deliver(
        &mut self,
        k: usize,
        token: u32,
        answer: Answer,
    ) -> Result<Option<Vec<callout::CallRequest>>, Verdict> {
        match self.call(k, |vm, id, ex| {
            vm.call_response(token, answer, Some(id), ex)
        })? {
            Some(((), outbox)) => Ok(Some(self.open_streams(k, outbox))),
            None => Ok(None),
        }
    }

    /// Delivers what plugin `k`'s streams brought while the request went on, and makes the
    /// calls those callbacks ask for (a resume counts for nothing: the walk is already past
    /// that point). `false` when the plugin failed open.
    async fn deliver_ready(&mut self, k: usize) -> Result<bool, Verdict> {
        while let Some((token, event)) = self.parts[k].streams.as_mut().and_then(Streams::ready) {
            let Some(calls) = self.deliver(k, token, Answer::Stream(event))? else {
                return Ok(false);
            };
            if !self.settle(k, calls).await? {
                return Ok(false);
            }
        }
        self.exchange.continued = false;
        Ok(true)
    }

    /// Carries out what plugin `k` asked of its streams; gives back the calls it asked for.
    fn open_streams(&mut self, k: usize, outbox: Outbox) -> Vec<callout::CallRequest> {
        let limit = self.set.plugins[self.parts[k].plugin].cfg.buffer_bytes;
        outbox.open_streams(&mut self.parts[k].streams, limit)
    }

    /// Plugin `k` paused at the end of a stream with nothing of its own pending. As on Envoy,
    /// another context of its VM may resume, answer or reset it (its root context's tick, or
    /// another request's callback); when one could (the plugin ticks, or other requests share
    /// its VM) it waits for that, at most [`PAUSE_LIMIT`]. Otherwise, or past the limit, the
    /// plugin failed (its fail policy decides).
    async fn wait_resumed(&mut self, k: usize) -> Result<(), Verdict> {
        let plugin = self.set.plugins[self.parts[k].plugin].clone();
        let Some((id, g)) = self.parts[k].context else {
            return Ok(());
        };
        let mut could = plugin
            .shared
            .tick_ms
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0;
        if !could {
            on_context_vm(&plugin, g, |vm| {
                could = vm.others_live(id);
                Ok(())
            });
        }
        let resumed = if could {
            resume::wait(plugin.uid, g, id, PAUSE_LIMIT).await
        } else {
            None
        };
        let name = &plugin.cfg.name;
        match resumed {
            Some(Resume::Continue) => Ok(()),
            Some(Resume::Reset) => {
                self.decisions.push(format!("{name}:reset"));
                Err(Verdict::Reset)
            }
            Some(Resume::Respond(local)) => {
                self.decisions
                    .push(format!("{name}:respond {}", local.status));
                Err(Verdict::Respond(local))
            }
            None => {
                tracing::warn!(plugin = %name, waited = could, "plugin paused at the end of the stream and nothing resumed it");
                self.failed::<()>(k, "paused with nothing to resume it")
                    .map(|_| ())
            }
        }
    }

    /// The request: headers (names lowercase) and the whole body, before any upstream
    /// connection. Plugins may change both, or answer instead. `Ok(Some)`: the headers as
    /// plugins left them, when one edited them (unedited headers need not be put back);
    /// later phases still read them (`request.*` properties, the request's header map).
    pub async fn on_request(
        &mut self,
        headers: Headers,
        body: &mut Bytes,
    ) -> Result<Option<Headers>, Verdict> {
        let (authorization, rest) = headers.into_iter().partition(|(k, _)| k == "authorization");
        self.authorization = authorization;
        self.exchange.request_headers = rest;
        self.exchange.request_body = body.clone();
        let r = self.request_phases(!body.is_empty()).await;
        *body = std::mem::take(&mut self.exchange.request_body);
        r?;
        if self.decisions.is_empty() {
            self.decisions.push("allow".into());
        }
        if !self.exchange.request_headers_edited {
            return Ok(None);
        }
        let mut edited = self.exchange.request_headers.clone();
        edited.extend(self.authorization.iter().cloned());
        Ok(Some(edited))
    }

    /// The request's phases in Envoy's order: headers plugin by plugin; a plugin that pauses
    /// them gets the body before the headers go on to the next.
    async fn request_phases(&mut self, has_body: bool) -> Result<(), Verdict> {
        let mut bodied = 0;
        for k in 0..self.parts.len() {
            if self.step(k, Phase::RequestHeaders, !has_body).await? == Action::Continue {
                continue;
            }
            if !has_body {
                self.wait_resumed(k).await?;
                continue;
            }
            self.request_bodies(bodied..k + 1).await?;
            bodied = k + 1;
        }
        if has_body {
            self.request_bodies(bodied..self.parts.len()).await?;
        }
        Ok(())
    }

    /// The whole request body through the plugins in `range`.
    async fn request_bodies(&mut self, range: std::ops::Range<usize>) -> Result<(), Verdict> {
        for k in range {
            if self.step(k, Phase::RequestBody, true).await? == Action::Pause {
                self.wait_resumed(k).await?;
            }
        }
        Ok(())
    }

    /// The response's headers (status in `:status`). Plugins may change them or answer instead;
    /// one that pauses them holds them back ([`Self::holds_header`]). `Ok(Some)`: the headers
    /// as plugins left them, when one edited them.
    pub async fn on_response_headers(
        &mut self,
        headers: Headers,
    ) -> Result<Option<&Headers>, Verdict> {
        self.exchange.response_code = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
        self.exchange.response_headers = headers;
        for k in 0..self.parts.len() {
            if self.step(k, Phase::ResponseHeaders, false).await? == Action::Pause {
                self.holds_header = true;
            }
        }
        let headers = &self.exchange.response_headers;
        self.fixed_length =
            self.sees_response_body() && headers.iter().any(|(k, _)| k == "content-length");
        Ok(self.exchange.response_headers_edited.then_some(headers))
    }

    /// A response body chunk, as it passes (`end` on the last). Plugins may rewrite it; one
    /// that pauses before the end holds it back, and gets it whole with the next chunk.
    pub async fn on_response_body(&mut self, chunk: Bytes, end: bool) -> Result<Bytes, Verdict> {
        self.exchange.response_size += chunk.len() as u64;
        if !self.sees_response_body() {
            return Ok(chunk);
        }
        let mut data = chunk;
        for k in 0..self.parts.len() {
            let plugin = &self.set.plugins[self.parts[k].plugin];
            let limit = plugin.cfg.buffer_bytes;
            if !plugin.compiled.sees_response_body {
                continue;
            }
            let held = std::mem::take(&mut self.parts[k].held);
            if !held.is_empty() {
                let mut all = held;
                all.extend_from_slice(&data);
                data = all.into();
            }
            let given = data.len();
            self.exchange.response_body = data;
            let action = self.step(k, Phase::ResponseBody, end).await?;
            data = std::mem::take(&mut self.exchange.response_body);
            if self.fixed_length && action == Action::Continue && data.len() != given {
                return Err(self.length_changed(k));
            }
            if action == Action::Pause {
                if end {
                    self.wait_resumed(k).await?;
                    continue;
                }
                if data.len() > limit {
                    let name = self.set.plugins[self.parts[k].plugin].cfg.name.clone();
                    self.decisions.push(format!("{name}:buffer_full"));
                    return Err(Verdict::BufferFull {
                        plugin: name,
                        limit,
                    });
                }
                self.parts[k].held = data.into();
                return Ok(Bytes::new());
            }
        }
        Ok(data)
    }

    /// Plugin `k` changed the length of an answer whose `Content-Length` went out: the client
    /// could not tell where it ends, so the answer is cut (Envoy would send it misframed).
    fn length_changed(&mut self, k: usize) -> Verdict {
        let name = &self.set.plugins[self.parts[k].plugin].cfg.name;
        tracing::warn!(plugin = %name, "plugin changed the length of an answer but left its content-length: the answer is cut (remove content-length in on_http_response_headers, as on Envoy)");
        self.decisions.push(format!("{name}:length_changed"));
        Verdict::Reset
    }

    /// Ends the request in every plugin (`proxy_on_log`, `_done`, `_delete`).
    pub fn finish(&mut self) {
        if self.finished || this_thread() != self.thread {
            return;
        }
        self.finished = true;
        for part in &mut self.parts {
            let plugin = &self.set.plugins[part.plugin];
            if let Some((id, g)) = part.context {
                let started = Instant::now();
                let exchange = &mut self.exchange;
                let streams = part.streams.as_ref().map_or(&[][..], |s| s.opened());
                on_context_vm(plugin, g, |vm| {
                    // The request's streams end with it (dropped with this run): the VM, which
                    // serves other requests, must not count them any more.
                    vm.forget_streams(streams);
                    vm.finish(id, exchange)
                });
                part.spent += started.elapsed();
            }
            // A plugin the request never reached (an earlier one answered) is not counted.
            if part.context.is_some() || !part.spent.is_zero() {
                plugin.request_time.observe(part.spent);
            }
        }
    }

    /// Time this request spent in plugin calls, every plugin's.
    pub fn spent(&self) -> Duration {
        self.parts.iter().map(|p| p.spent).sum()
    }

    /// Each active plugin's name and the time this request spent in it, in the plugins' order.
    pub fn each_spent(&self) -> impl Iterator<Item = (&str, Duration)> + '_ {
        self.parts
            .iter()
            .map(|p| (self.set.plugins[p.plugin].cfg.name.as_str(), p.spent))
    }
}

/// This thread, cheaply (a thread-local's address; `std::thread::current()` counts a
/// reference each time): a run's contexts live in the VMs of the thread it started on.
fn this_thread() -> usize {
    thread_local!(static HERE: u8 = const { 0 });
    HERE.with(|h| h as *const u8 as usize)
}

/// Runs `f` on this thread's VM of `plugin` if it is still generation `g`, the one holding the
/// request's context: a VM rebuilt since (after a failure) never heard of the request.
fn on_context_vm(plugin: &super::Plugin, g: u64, f: impl FnOnce(&mut Vm) -> Result<(), String>) {
    let _ = with_vm(
        plugin,
        |vm, generation| {
            if generation == g {
                f(vm)
            } else {
                Ok(())
            }
        },
    );
}

impl Drop for PluginRun {
    fn drop(&mut self) {
        self.finish();
    }
}

impl std::fmt::Debug for PluginRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRun")
            .field("decisions", &self.decisions)
            .field("spent", &self.spent())
            .finish()
    }
}
