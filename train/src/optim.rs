//! AdamW with its state in the open, so checkpoints can store the moments and a resumed run
//! continues exactly where it stopped (candle-nn's AdamW keeps them private).

use crate::models::{flat, Params};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// Updates applied so far.
    pub step: usize,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: &Params, cfg: AdamWConfig) -> Result<Self> {
        let mut m = Vec::new();
        let mut v = Vec::new();
        for (_, var) in params.vars() {
            m.push(var.zeros_like()?);
            v.push(var.zeros_like()?);
        }
        Ok(Self { cfg, step: 0, m, v })
    }

    /// One update with learning rate `lr`. Parameters without a gradient are left alone.
    pub fn step(&mut self, params: &Params, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, (_, var)) in params.vars().iter().enumerate() {
            let Some(g) = grads.get(var) else { continue };
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            // Gradients carry their op graph; keeping it in the moments would chain every
            // step's graph to the next one and grow memory without bound.
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(())
    }

    /// The same update with the gradients given as flat vectors in `params.vars()` order
    /// (the CPU training step's output), fused into one pass per parameter.
    pub fn step_flat(&mut self, params: &Params, grads: &[Vec<f32>], lr: f64) -> Result<()> {
        assert_eq!(
            grads.len(),
            params.vars().len(),
            "one gradient per parameter"
        );
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = (1.0 - c.beta1.powi(t)) as f32;
        let bc2 = (1.0 - c.beta2.powi(t)) as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let lr = lr as f32;
        for (i, ((_, var), g)) in params.vars().iter().zip(grads).enumerate() {
            let mut w = flat(var.as_tensor())?;
            let mut m = flat(&self.m[i])?;
            let mut v = flat(&self.v[i])?;
            assert_eq!(g.len(), w.len(), "gradient size of parameter {i}");
            // Element-wise, so splitting it over threads changes no bit of the result (and
            // run serially it leaves the other core idle between the step's parallel parts).
            const CHUNK: usize = 1 << 14;
            w.par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((w, m), v), g)| {
                    for (((w, m), v), g) in w.iter_mut().zip(m).zip(v).zip(g) {
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        let update = (*m / bc1) / ((*v / bc2).sqrt() + eps);
                        *w = *w * decay - lr * update;
                    }
                });
            let (dev, shape) = (var.device(), var.shape());
            var.set(&Tensor::from_vec(w, shape, dev)?)?;
            self.m[i] = Tensor::from_vec(m, shape, dev)?;
            self.v[i] = Tensor::from_vec(v, shape, dev)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`adam.m.NAME`, `adam.v.NAME`).
    pub fn state(&self, params: &Params) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in params.vars().iter().enumerate() {
            out.insert(format!("adam.m.{name}"), self.m[i].clone());
            out.insert(format!("adam.v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`].
    pub fn restore(
        &mut self,
        params: &Params,
        from: &HashMap<String, Tensor>,
        step: usize,
    ) -> anyhow::Result<()> {
        for (i, (name, var)) in params.vars().iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let t = saved(from, &format!("adam.{kind}.{name}"), var, "optimizer state")?;
                *slot = t.to_device(var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Checkpoint tensor `key`, which must have `var`'s shape; `what` names it in errors.
fn saved<'a>(
    from: &'a HashMap<String, Tensor>,
    key: &str,
    var: &candle_core::Var,
    what: &str,
) -> anyhow::Result<&'a Tensor> {
    let t = from
        .get(key)
        .ok_or_else(|| anyhow::anyhow!("checkpoint lacks {what} '{key}'"))?;
    anyhow::ensure!(t.dims() == var.dims(), "{what} '{key}' has the wrong shape");
    Ok(t)
}

/// An exponential moving average of the parameters: `shadow = d·shadow + (1 − d)·w` after every
/// update, with `d = min(decay, (1 + t)/(10 + t))` at update `t` so the first updates are not
/// swamped by the initial weights. Small networks trained on a short schedule end on noisy
/// weights; their average generalises better. Batch-norm statistics are not averaged: they are
/// recomputed for the averaged weights at the end (`train::recalibrate_bn`).
pub struct Ema {
    decay: f64,
    shadow: Vec<Vec<f32>>,
}

impl Ema {
    pub fn new(params: &Params, decay: f64) -> Result<Self> {
        let shadow = params
            .vars()
            .iter()
            .map(|(_, v)| flat(v.as_tensor()))
            .collect::<Result<_>>()?;
        Ok(Self { decay, shadow })
    }

    /// Folds the parameters in after update `t` (1-based).
    pub fn update(&mut self, params: &Params, t: usize) -> Result<()> {
        let d = self.decay.min((1 + t) as f64 / (10 + t) as f64) as f32;
        for (s, (_, var)) in self.shadow.iter_mut().zip(params.vars()) {
            let w = flat(var.as_tensor())?;
            s.par_chunks_mut(1 << 14)
                .zip(w.par_chunks(1 << 14))
                .for_each(|(s, w)| {
                    s.iter_mut()
                        .zip(w)
                        .for_each(|(s, w)| *s = d * *s + (1.0 - d) * w);
                });
        }
        Ok(())
    }

    /// Overwrites the parameters with the average.
    pub fn assign_to(&self, params: &Params) -> Result<()> {
        for (s, (_, var)) in self.shadow.iter().zip(params.vars()) {
            var.set(&Tensor::from_vec(s.clone(), var.shape(), var.device())?)?;
        }
        Ok(())
    }

    /// The average as named tensors (`ema.NAME`), for checkpoints.
    pub fn state(&self, params: &Params) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (s, (name, var)) in self.shadow.iter().zip(params.vars()) {
            let t = Tensor::from_vec(s.clone(), var.shape(), &candle_core::Device::Cpu)?;
            out.insert(format!("ema.{name}"), t);
        }
        Ok(out)
    }

    /// Restores an average saved by [`Ema::state`].
    pub fn restore(
        &mut self,
        params: &Params,
        from: &HashMap<String, Tensor>,
    ) -> anyhow::Result<()> {
        for (s, (name, var)) in self.shadow.iter_mut().zip(params.vars()) {
            *s = flat(saved(from, &format!("ema.{name}"), var, "weight average")?)?;
        }
        Ok(())
    }
}

/// Learning rate at `step` of `total`: linear warm-up over `warmup` steps, then cosine decay
/// to zero. One-cycle-like schedules reach a given accuracy in fewer epochs than a constant rate.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = (total - warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The average follows its formula, warm-up included, and lands on the parameters.
    #[test]
    fn ema_averages_with_a_warm_up() {
        let mut p = Params::default();
        let var = p
            .uniform("w", &[3], 1.0, &mut crate::loader::rng(1, 1), &Device::Cpu)
            .unwrap();
        let w0 = flat(var.as_tensor()).unwrap();
        let mut ema = Ema::new(&p, 0.9).unwrap();
        let mut want = w0.clone();
        for t in 1..=30 {
            let w: Vec<f32> = w0.iter().map(|x| x + t as f32).collect();
            var.set(&Tensor::new(w.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            ema.update(&p, t).unwrap();
            let d = 0.9f64.min((1 + t) as f64 / (10 + t) as f64) as f32;
            want = want
                .iter()
                .zip(&w)
                .map(|(s, w)| d * s + (1.0 - d) * w)
                .collect();
        }
        let state = ema.state(&p).unwrap();
        assert_eq!(flat(&state["ema.w"]).unwrap(), want);
        ema.assign_to(&p).unwrap();
        assert_eq!(flat(var.as_tensor()).unwrap(), want);
        let mut other = Ema::new(&p, 0.9).unwrap();
        other.restore(&p, &state).unwrap();
        assert_eq!(other.shadow, ema.shadow);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!(lr_at(0, 100, 10, 1.0) < 0.2);
        assert!((lr_at(9, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!(lr_at(55, 100, 10, 1.0) < lr_at(20, 100, 10, 1.0));
        assert!(lr_at(100, 100, 10, 1.0).abs() < 1e-12);
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let mut params = Params::default();
        let mut r = crate::loader::rng(0, 0);
        let x = params
            .uniform("x", &[3], 1.0, &mut r, &Device::Cpu)
            .unwrap();
        let target = Tensor::new(&[3f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            &params,
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..500 {
            let loss = (x.as_tensor() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&params, &grads, 0.05).unwrap();
        }
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        for (g, t) in got.iter().zip([3.0, -2.0, 0.5]) {
            assert!((g - t).abs() < 1e-2, "{got:?}");
        }
    }
}
