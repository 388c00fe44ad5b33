//! Incremental decoding on the CPU backend: each sequence keeps the rotated keys and values
//! of its tokens per layer, so that a new token costs one row through the model plus its
//! attention over the cache, instead of a forward over the whole sequence.

use crate::model::layer;
use crate::model::Model;
use crate::ops::cpu::{attention_over, CpuOps};
use crate::ops::Ops;

/// One sequence's keys and values per layer, `[len, kv_heads * head_dim]` each, keys
/// already rotated to their positions.
#[derive(Clone, Debug)]
struct SeqCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

/// Token rows of several sequences decoded together, each sequence with its KV cache.
pub struct Decoder<'a> {
    model: &'a Model<Vec<f32>>,
    seqs: Vec<SeqCache>,
}

impl<'a> Decoder<'a> {
    /// `sequences` empty sequences.
    pub fn new(model: &'a Model<Vec<f32>>, sequences: usize) -> Self {
        let layers = model.cfg.num_layers;
        let empty = SeqCache {
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
            len: 0,
        };
        Decoder {
            model,
            seqs: vec![empty; sequences],
        }
    }

    /// Tokens fed to sequence `seq` so far.
    pub fn len(&self, seq: usize) -> usize {
        self.seqs[seq].len
    }

    /// Appends `tokens` to sequence `seq` for every `(seq, tokens)` of `feeds` (distinct
    /// sequences, at least one token each), all in one pass through the model, and returns
    /// the logits after each feed's last token, `[feeds.len(), vocab]`. A prompt is one feed
    /// (the prefill); each generated token is another.
    pub fn feed(&mut self, feeds: &[(usize, &[u32])]) -> Vec<f32> {
        let cfg = &self.model.cfg;
        let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let kvw = cfg.num_kv_heads * cfg.head_dim;
        let mut tokens = Vec::new();
        // Per row: its sequence and absolute position.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        let mut last_rows = Vec::with_capacity(feeds.len());
        let mut fed = vec![false; self.seqs.len()];
        for &(seq, ids) in feeds {
            assert!(!ids.is_empty(), "a feed needs at least one token");
            assert!(!fed[seq], "sequence {seq} is fed twice in one call");
            fed[seq] = true;
            let start = self.seqs[seq].len;
            tokens.extend_from_slice(ids);
            rows.extend((start..start + ids.len()).map(|pos| (seq, pos)));
            last_rows.push(rows.len() as u32 - 1);
        }
        let positions: Vec<u32> = rows.iter().map(|&(_, pos)| pos as u32).collect();
        let ops = CpuOps;
        let params = &self.model.params;
        let mut h = ops.embedding(&params.embed, &tokens, d);
        for (l, p) in params.layers.iter().enumerate() {
            let seqs = &mut self.seqs;
            let (next, _) = layer::forward_with(&ops, cfg, p, &h, &positions, |q, k, v| {
                for (r, &(seq, _)) in rows.iter().enumerate() {
                    seqs[seq].keys[l].extend_from_slice(&k[r * kvw..(r + 1) * kvw]);
                    seqs[seq].values[l].extend_from_slice(&v[r * kvw..(r + 1) * kvw]);
                }
                // docs/model.md: a token sees the keys at positions in (pos - window, pos].
                let kv: Vec<(&[f32], &[f32])> = rows
                    .iter()
                    .map(|&(seq, pos)| {
                        let first = cfg
                            .sliding_window
                            .map_or(0, |w| (pos + 1).saturating_sub(w));
                        let span = first * kvw..(pos + 1) * kvw;
                        let c = &seqs[seq];
                        (&c.keys[l][span.clone()], &c.values[l][span])
                    })
                    .collect();
                attention_over(q, &kv, layer::attn_shape(cfg))
            });
            h = next;
        }
        for &(seq, ids) in feeds {
            self.seqs[seq].len += ids.len();
        }
        let last = ops.gather_rows(&h, &last_rows, None, d);
        let normed = ops.rmsnorm(&last, &params.final_norm, d, cfg.rms_norm_eps);
        ops.matmul(&normed, params.head(), feeds.len(), d, vocab)
    }
}
