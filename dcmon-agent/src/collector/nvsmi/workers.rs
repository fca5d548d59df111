//! One thread per GPU, so that a GPU whose NVML calls block (a wedged driver, a board going
//! off the bus) holds up its own readings only: each round asks every idle worker for a
//! reading and waits for all of them until one shared deadline. A worker still busy at the
//! deadline is reported unresponsive and is not asked again (nor replaced: a second thread
//! would block the same way) until it answers; its late answer is dropped as stale. Later
//! rounds do not wait for it: only the round that asked pays the timeout.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::NvmlHandle;
use super::nvml::{GpuRound, GpuState, read_gpu};

/// One GPU's thread and the channels to it.
struct Worker {
    index: u32,
    /// `None` once the collector is being dropped (closing it ends the thread).
    requests: Option<Sender<()>>,
    replies: Receiver<GpuRound>,
    /// A request is out and not answered yet.
    busy: bool,
    /// The thread ended (it panicked): no more requests.
    gone: bool,
    thread: Option<JoinHandle<()>>,
    /// The labels of its last answer, for reporting it while it does not answer.
    last: Option<GpuRound>,
}

/// What a round got from one GPU.
#[derive(Debug)]
pub enum Answer {
    /// The GPU's worker answered in time.
    Read(GpuRound),
    /// Its worker did not answer by the deadline; the GPU's last answer, if it ever gave one.
    Unresponsive { index: u32, last: Option<GpuRound> },
    /// Its worker thread is gone.
    Gone { index: u32 },
}

/// The per-GPU worker threads.
pub struct Workers {
    nvml: Arc<NvmlHandle>,
    workers: Vec<Worker>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("gpus", &self.workers.len()).finish_non_exhaustive()
    }
}

impl Workers {
    /// No workers yet; [`Workers::round`] starts one per GPU NVML counts.
    pub fn new(nvml: Arc<NvmlHandle>) -> Self {
        Self { nvml, workers: Vec::new() }
    }

    /// The library the workers share.
    pub fn nvml(&self) -> &NvmlHandle {
        &self.nvml
    }

    /// Ask each of GPUs `0..count` for a reading and wait for the answers until `timeout` has
    /// passed; the answers in index order.
    pub fn round(&mut self, count: u32, timeout: Duration) -> std::io::Result<Vec<Answer>> {
        while self.workers.len() < count as usize {
            let index = u32::try_from(self.workers.len()).unwrap_or(u32::MAX);
            self.workers.push(spawn(index, Arc::clone(&self.nvml))?);
        }
        let deadline = Instant::now() + timeout;
        // Whether each worker was asked this round: one still in an earlier round's call is
        // not waited for (its answer would be stale), so a hung GPU costs one round the
        // timeout, not every round.
        let mut asked = Vec::with_capacity(count as usize);
        for w in self.workers.iter_mut().take(count as usize) {
            if w.busy {
                match w.replies.try_recv() {
                    // The answer to a request that ran past an earlier deadline: stale.
                    Ok(_) => w.busy = false,
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => w.gone = true,
                }
            }
            let ask = !w.busy && !w.gone;
            if ask {
                match w.requests.as_ref().map(|r| r.send(())) {
                    Some(Ok(())) => w.busy = true,
                    _ => w.gone = true,
                }
            }
            asked.push(ask && !w.gone);
        }
        let mut answers = Vec::with_capacity(count as usize);
        for (w, asked) in self.workers.iter_mut().take(count as usize).zip(asked) {
            if w.gone {
                answers.push(Answer::Gone { index: w.index });
                continue;
            }
            if !asked {
                answers.push(Answer::Unresponsive { index: w.index, last: w.last.clone() });
                continue;
            }
            match w.replies.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(round) => {
                    w.busy = false;
                    w.last = Some(round.clone());
                    answers.push(Answer::Read(round));
                }
                Err(RecvTimeoutError::Timeout) => {
                    answers.push(Answer::Unresponsive { index: w.index, last: w.last.clone() });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    w.gone = true;
                    answers.push(Answer::Gone { index: w.index });
                }
            }
        }
        Ok(answers)
    }
}

fn spawn(index: u32, nvml: Arc<NvmlHandle>) -> std::io::Result<Worker> {
    let (requests, requested) = mpsc::channel::<()>();
    let (reply, replies) = mpsc::channel();
    let thread = std::thread::Builder::new().name(format!("dcmon-gpu{index}")).spawn(move || {
        let Some(lib) = nvml.0.as_deref() else { return };
        let mut state = GpuState::new(index);
        let mut device = None;
        while requested.recv().is_ok() {
            if device.is_none() {
                device = match lib.device_by_index(index) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        let round = GpuRound::failed(index, &e);
                        if reply.send(round).is_err() {
                            return;
                        }
                        continue;
                    }
                };
            }
            let Some(dev) = device.as_ref() else { continue };
            if reply.send(read_gpu(dev, &mut state)).is_err() {
                return;
            }
        }
    })?;
    Ok(Worker { index, requests: Some(requests), replies, busy: false, gone: false, thread: Some(thread), last: None })
}

impl Drop for Workers {
    /// Closes every worker's requests and waits for the idle ones to end, so that NVML is shut
    /// down when the collector goes (the last reference to it goes with the last worker). A
    /// worker blocked in a call is left behind: shutting NVML down under it is worse.
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.requests = None;
        }
        for w in &mut self.workers {
            if w.busy {
                continue;
            }
            if let Some(t) = w.thread.take()
                && t.join().is_err()
            {
                tracing::warn!(gpu = w.index, "GPU worker thread panicked");
            }
        }
    }
}
