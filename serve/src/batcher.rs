//! Dynamic batching: requests from many connections meet on one thread that owns the model,
//! which concatenates their rows into one forward pass and splits the answer back.
//!
//! The thread takes the first waiting request, then gathers more until the batch holds
//! `max_batch_size` rows or its oldest request has waited `max_batch_delay` (what is already
//! waiting then still joins, up to the size), so a lone request never waits longer than the
//! delay and a busy queue fills batches at once. A request larger than `max_batch_size` runs
//! alone; requests of different kinds (numbers, text, text to continue) never share a forward
//! pass, and one that generates text runs alone. When to close a batch is decided by the pure
//! [`gather`] and [`joins`]; the rest of this file is plumbing.
//!
//! Admission: a request is refused at once (503) when `max_queue` requests are already waiting,
//! never queued.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::ServeError;
use crate::model::{Input, Model};
use crate::stats::Stats;

/// How requests are batched and how many may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// The most rows in one forward pass (a larger request runs alone). 1: no batching.
    pub max_batch_size: usize,
    /// The longest the oldest request of a batch waits for others.
    pub max_batch_delay: Duration,
    /// The most requests waiting (admitted, not yet in a batch); more are refused.
    pub max_queue: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { max_batch_size: 32, max_batch_delay: Duration::from_millis(2), max_queue: 1024 }
    }
}

impl Settings {
    pub fn check(&self) -> Result<(), ServeError> {
        if self.max_batch_size == 0 {
            return Err(ServeError::Settings("max_batch_size must be at least 1".into()));
        }
        if self.max_queue == 0 {
            return Err(ServeError::Settings("max_queue must be at least 1".into()));
        }
        Ok(())
    }
}

/// What a request asks of the model; only requests of one kind share a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Floats,
    Text,
    /// Text to continue: runs alone.
    Generate,
}

/// What the model thread does next with the batch it is gathering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gather {
    /// Run it now.
    Run,
    /// Its time is up: take requests already waiting (if they fit), then run it.
    TakeWaiting,
    /// Wait at most this long for another request.
    Wait(Duration),
}

/// The decision for a batch of `rows` rows of `kind` whose oldest request has waited `waited`.
pub(crate) fn gather(kind: Kind, rows: usize, waited: Duration, settings: &Settings) -> Gather {
    if kind == Kind::Generate || rows >= settings.max_batch_size {
        Gather::Run
    } else if waited >= settings.max_batch_delay {
        Gather::TakeWaiting
    } else {
        Gather::Wait(settings.max_batch_delay - waited)
    }
}

/// Whether a request of `kind` with `rows` rows joins a batch of `batch_rows` rows of
/// `batch_kind`; if not, it starts the next batch.
pub(crate) fn joins(batch_kind: Kind, batch_rows: usize, kind: Kind, rows: usize, settings: &Settings) -> bool {
    kind == batch_kind && kind != Kind::Generate && batch_rows + rows <= settings.max_batch_size
}

/// The model's answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// rows * classes.
    pub probabilities: Vec<f32>,
    /// One string per prompt, for a request that asked to generate.
    pub continuation: Option<Vec<String>>,
}

/// One request on its way to the model thread.
struct Job {
    input: Input,
    generate: Option<usize>,
    arrived: Instant,
    reply: oneshot::Sender<Result<Output, ServeError>>,
}

impl Job {
    fn kind(&self) -> Kind {
        match (&self.input, self.generate) {
            (Input::Floats { .. }, _) => Kind::Floats,
            (Input::Text(_), None) => Kind::Text,
            (Input::Text(_), Some(_)) => Kind::Generate,
        }
    }
}

/// Requests waiting for the model thread. The thread is woken only when it has nothing to do
/// or a full batch is waiting, not by every request: on a busy core each wake-up is a context
/// switch, which would cost more than a small model's forward pass.
struct Queue {
    /// A std mutex: held to push or pop, never across an await.
    state: Mutex<Waiting>,
    wake: Condvar,
}

struct Waiting {
    jobs: VecDeque<Job>,
    /// Rows of `jobs`, all together.
    rows: usize,
    /// The model thread waits for a first request (rather than gathering a batch).
    idle: bool,
    /// Rows of the batch the model thread is gathering, while it waits for more.
    gathered: usize,
    /// No more requests come: the thread finishes those waiting, then ends.
    closed: bool,
}

/// How [`Queue::pop`] waits.
enum Pop {
    /// Until a request comes (the thread is idle).
    Block,
    /// At most this long, woken early only by a full batch: `.1` rows are gathered already.
    For(Duration, usize),
    /// Not at all.
    Now,
}

impl Queue {
    fn new() -> Queue {
        let state = Waiting { jobs: VecDeque::new(), rows: 0, idle: false, gathered: 0, closed: false };
        Queue { state: Mutex::new(state), wake: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// False once closed.
    fn push(&self, job: Job, full: usize) -> Result<(), Job> {
        let mut w = self.lock();
        if w.closed {
            return Err(job);
        }
        w.rows += job.input.rows();
        w.jobs.push_back(job);
        if w.idle || w.gathered + w.rows >= full {
            self.wake.notify_one();
        }
        Ok(())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// The oldest waiting request; `None` when none came in time, or (with `Block`) when the
    /// queue is closed and empty.
    fn pop(&self, how: Pop) -> Option<Job> {
        let mut w = self.lock();
        let deadline = match how {
            Pop::For(d, gathered) => {
                w.gathered = gathered;
                Some(Instant::now() + d)
            }
            _ => None,
        };
        while w.jobs.is_empty() && !w.closed {
            match (&how, deadline) {
                (Pop::Block, _) => {
                    w.idle = true;
                    w = self.wake.wait(w).unwrap_or_else(|p| p.into_inner());
                    w.idle = false;
                }
                (Pop::For(..), Some(deadline)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        w.gathered = 0;
                        return None;
                    }
                    w = self.wake.wait_timeout(w, left).unwrap_or_else(|p| p.into_inner()).0;
                }
                _ => return None,
            }
        }
        w.gathered = 0;
        let job = w.jobs.pop_front()?;
        w.rows -= job.input.rows();
        Some(job)
    }
}

/// The sending side, shared by every connection.
pub(crate) struct Batcher {
    queue: Arc<Queue>,
    settings: Settings,
    stats: Arc<Stats>,
}

impl Batcher {
    /// Starts the model's thread. `classes` is the width of the model's output rows.
    pub(crate) fn start(
        model: Box<dyn Model>,
        classes: usize,
        settings: Settings,
        stats: Arc<Stats>,
    ) -> Result<(Batcher, JoinHandle<()>), ServeError> {
        settings.check()?;
        let queue = Arc::new(Queue::new());
        let thread = ModelThread { model, classes, settings, stats: stats.clone() };
        let consumer = queue.clone();
        let handle = std::thread::Builder::new()
            .name("model".into())
            .spawn(move || thread.run(&consumer))
            .map_err(ServeError::Thread)?;
        Ok((Batcher { queue, settings, stats }, handle))
    }

    /// Runs `input` in the next batch it fits in, unless `max_queue` requests are waiting.
    pub(crate) async fn infer(&self, input: Input, generate: Option<usize>) -> Result<Output, ServeError> {
        let max = self.settings.max_queue;
        let depth = &self.stats.queue_depth;
        if depth.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1)).is_err() {
            return Err(ServeError::QueueFull(max));
        }
        let (reply, answer) = oneshot::channel();
        let job = Job { input, generate, arrived: Instant::now(), reply };
        if self.queue.push(job, self.settings.max_batch_size).is_err() {
            depth.fetch_sub(1, Ordering::SeqCst);
            return Err(ServeError::ShuttingDown);
        }
        answer.await.unwrap_or_else(|_| Err(ServeError::Model("the model thread stopped".into())))
    }

    /// Refuses new requests; the thread finishes those already sent, then ends.
    pub(crate) fn close(&self) {
        self.queue.close();
    }
}

/// The thread that owns the model.
struct ModelThread {
    model: Box<dyn Model>,
    classes: usize,
    settings: Settings,
    stats: Arc<Stats>,
}

impl ModelThread {
    fn run(mut self, queue: &Queue) {
        // A request that did not fit the last batch: the first of the next.
        let mut next: Option<Job> = None;
        loop {
            let first = match next.take() {
                Some(job) => job,
                None => match queue.pop(Pop::Block) {
                    Some(job) => job,
                    None => return,
                },
            };
            let Some(first) = self.admit(first) else { continue };
            let (kind, oldest) = (first.kind(), first.arrived);
            let mut rows = first.input.rows();
            let mut batch = vec![first];
            loop {
                let job = match gather(kind, rows, oldest.elapsed(), &self.settings) {
                    Gather::Run => break,
                    Gather::TakeWaiting => match queue.pop(Pop::Now) {
                        Some(job) => job,
                        None => break,
                    },
                    Gather::Wait(timeout) => match queue.pop(Pop::For(timeout, rows)) {
                        Some(job) => job,
                        None => continue,
                    },
                };
                if !joins(kind, rows, job.kind(), job.input.rows(), &self.settings) {
                    next = Some(job);
                    break;
                }
                if let Some(job) = self.admit(job) {
                    rows += job.input.rows();
                    batch.push(job);
                }
            }
            self.run_batch(kind, rows, batch);
        }
    }

    /// Takes `job` out of the queue into a batch, unless the model refuses its input (a 400 of
    /// its own, so it cannot fail the requests batched with it).
    fn admit(&self, job: Job) -> Option<Job> {
        self.stats.queue_depth.fetch_sub(1, Ordering::SeqCst);
        match guarded(|| self.model.validate(&job.input)) {
            Ok(()) => Some(job),
            Err(reason) => {
                let _ = job.reply.send(Err(ServeError::BadRequest(format!("inputs[0].data: {reason}"))));
                None
            }
        }
    }

    fn run_batch(&mut self, kind: Kind, rows: usize, batch: Vec<Job>) {
        self.stats.record_batch(rows);
        let result = match kind {
            Kind::Generate => self.generate(&batch[0]).map(|(p, c)| (p, Some(c))),
            Kind::Floats | Kind::Text => self.forward(rows, &batch).map(|p| (p, None)),
        };
        let (probabilities, continuation) = match result {
            Ok(answer) => answer,
            Err(reason) => {
                for job in batch {
                    let _ = job.reply.send(Err(ServeError::Model(reason.clone())));
                }
                return;
            }
        };
        let mut at = 0;
        for job in batch {
            let end = at + job.input.rows() * self.classes;
            let output = Output { probabilities: probabilities[at..end].to_vec(), continuation: continuation.clone() };
            at = end;
            // The client may have gone; its answer is dropped.
            let _ = job.reply.send(Ok(output));
        }
    }

    /// One forward pass over the rows of every job, in order.
    fn forward(&mut self, rows: usize, batch: &[Job]) -> Result<Vec<f32>, String> {
        let input = match &batch[0].input {
            Input::Floats { .. } => {
                let mut data = Vec::new();
                for job in batch {
                    if let Input::Floats { data: d, .. } = &job.input {
                        data.extend_from_slice(d);
                    }
                }
                Input::Floats { rows, data }
            }
            Input::Text(_) => Input::Text(
                batch
                    .iter()
                    .flat_map(|job| match &job.input {
                        Input::Text(prompts) => prompts.clone(),
                        Input::Floats { .. } => Vec::new(),
                    })
                    .collect(),
            ),
        };
        let probabilities = guarded(|| self.model.forward(input))?;
        self.check_width(rows, &probabilities)?;
        Ok(probabilities)
    }

    fn generate(&mut self, job: &Job) -> Result<(Vec<f32>, Vec<String>), String> {
        let Input::Text(prompts) = &job.input else { return Err("only text can be continued".into()) };
        let probabilities = guarded(|| self.model.forward(job.input.clone()))?;
        self.check_width(prompts.len(), &probabilities)?;
        let chars = job.generate.unwrap_or_default();
        let continuation = guarded(|| self.model.continue_text(prompts, chars))?;
        if continuation.len() != prompts.len() {
            return Err(format!("{} continuations for {} prompts", continuation.len(), prompts.len()));
        }
        Ok((probabilities, continuation))
    }

    fn check_width(&self, rows: usize, probabilities: &[f32]) -> Result<(), String> {
        match probabilities.len() == rows * self.classes {
            true => Ok(()),
            false => Err(format!(
                "the model returned {} values for {rows} rows of {} classes",
                probabilities.len(),
                self.classes
            )),
        }
    }
}

/// A model call whose panic becomes an error of the batch instead of ending the thread.
fn guarded<T>(call: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(result) => result,
        Err(panic) => {
            let what =
                panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            Err(format!("the model panicked: {}", what.unwrap_or_else(|| "(no message)".into())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn settings(max_batch_size: usize, delay_ms: u64) -> Settings {
        Settings { max_batch_size, max_batch_delay: MS * delay_ms as u32, max_queue: 10 }
    }

    #[test]
    fn a_batch_waits_for_more_until_its_oldest_request_has_waited_the_delay() {
        let s = settings(8, 5);
        assert_eq!(gather(Kind::Floats, 1, Duration::ZERO, &s), Gather::Wait(5 * MS));
        assert_eq!(gather(Kind::Floats, 3, 2 * MS, &s), Gather::Wait(3 * MS));
        // Time is up: what already waits may still join, nothing more is waited for.
        assert_eq!(gather(Kind::Floats, 3, 5 * MS, &s), Gather::TakeWaiting);
        assert_eq!(gather(Kind::Text, 3, 50 * MS, &s), Gather::TakeWaiting);
    }

    #[test]
    fn a_full_batch_a_large_request_and_text_to_continue_run_at_once() {
        let s = settings(8, 5);
        assert_eq!(gather(Kind::Floats, 8, Duration::ZERO, &s), Gather::Run);
        assert_eq!(gather(Kind::Floats, 20, Duration::ZERO, &s), Gather::Run);
        assert_eq!(gather(Kind::Generate, 1, Duration::ZERO, &s), Gather::Run);
    }

    #[test]
    fn with_a_batch_size_of_one_nothing_waits() {
        let s = settings(1, 5);
        assert_eq!(gather(Kind::Floats, 1, Duration::ZERO, &s), Gather::Run);
        assert!(!joins(Kind::Floats, 0, Kind::Floats, 2, &s));
    }

    #[test]
    fn only_requests_of_one_kind_that_fit_join_a_batch() {
        let s = settings(8, 5);
        assert!(joins(Kind::Floats, 3, Kind::Floats, 5, &s));
        assert!(!joins(Kind::Floats, 3, Kind::Floats, 6, &s), "9 rows > 8");
        assert!(!joins(Kind::Floats, 1, Kind::Text, 1, &s));
        assert!(joins(Kind::Text, 1, Kind::Text, 1, &s));
        assert!(!joins(Kind::Text, 1, Kind::Generate, 1, &s));
        assert!(!joins(Kind::Generate, 1, Kind::Generate, 1, &s));
    }

    #[test]
    fn settings_of_zero_are_refused() {
        assert!(settings(0, 1).check().is_err());
        assert!(Settings { max_queue: 0, ..Settings::default() }.check().is_err());
        assert!(Settings::default().check().is_ok());
    }
}
