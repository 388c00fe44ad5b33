//! The attention kernels (cuda/attention.cu) in the emulator: forward and backward against the
//! CPU reference for every mask kind, head dims 24/64/80/96/128 (the tuned kernels) and
//! 129/200/256 (their `_d256` instances) and grouped-query ratios 1/2/3/4/8
//! (`selftest::attention_rows`); the tile lists against a brute-force derivation from the
//! layout; masked-out tiles never loaded, counted by the emulator's probe, and never read,
//! shown from outside the kernel by poisoning them; and
//! the backward's bits under different block orders and thread schedules.

mod common;

use contralign::ops::cuda::attention::{tile_rows, AttentionKernels, DeviceLayout, TileLists};
use contralign::ops::cuda::device::{Buffer, Device, Float};
use contralign::ops::cuda::emu;
use contralign::ops::cuda::pool::Pool;
use contralign::ops::{AttentionLayout, AttentionShape};
use contralign::selftest;
use half::bf16;
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::BTreeMap;

#[test]
fn attention_matches_the_cpu_reference_for_every_mask_and_shape() {
    let mut rng = common::rng("attention_matches_the_cpu_reference");
    let rows = selftest::attention_rows(&Device::Emu, &mut rng).unwrap();
    assert!(rows.iter().all(|r| r.pass), "{}", selftest::table(&rows));
    // Every case gives out, lse, dq, dk, dv in f32 and bf16.
    assert_eq!(rows.len(), 8 * 2 * 5);
}

/// (query tile, key tile) pairs with at least one key that a row of the query tile sees,
/// straight from `AttentionLayout::keys`.
fn needed_pairs(layout: &AttentionLayout, tile: usize) -> Vec<Vec<bool>> {
    let tiles = layout.len().div_ceil(tile);
    let mut needed = vec![vec![false; tiles]; tiles];
    for t in 0..layout.len() {
        for key in layout.keys(t) {
            needed[t / tile][key / tile] = true;
        }
    }
    needed
}

fn layouts() -> Vec<AttentionLayout> {
    vec![
        AttentionLayout::causal(97, None),
        AttentionLayout::causal(130, Some(17)),
        AttentionLayout::packed(
            &[(13, vec![40, 3, 22]), (1, vec![1, 1]), (50, vec![33])],
            None,
        ),
        AttentionLayout::packed(&[(37, vec![29, 64]), (5, vec![9, 18, 2])], Some(20)),
        // One 512-token prompt with 8 responses of 256, at a tenth of the size.
        AttentionLayout::packed(&[(51, vec![26; 8])], None),
    ]
}

#[test]
fn tile_lists_name_exactly_the_tiles_with_a_visible_key() {
    for layout in layouts() {
        for tile in [16, 32] {
            let lists = TileLists::new(&layout, tile);
            let needed = needed_pairs(&layout, tile);
            for (qt, row) in needed.iter().enumerate() {
                let want: Vec<i32> = (0..row.len() as i32)
                    .filter(|&kt| row[kt as usize])
                    .collect();
                assert_eq!(lists.key_tiles(qt), want, "query tile {qt} of {tile}");
            }
            for kt in 0..needed.len() {
                let want: Vec<i32> = (0..needed.len() as i32)
                    .filter(|&qt| needed[qt as usize][kt])
                    .collect();
                let got =
                    &lists.k_tiles[lists.k_offsets[kt] as usize..lists.k_offsets[kt + 1] as usize];
                assert_eq!(got, want, "key tile {kt} of {tile}");
            }
        }
    }
    // Packing pays: the responses behind one prompt skip each other's tiles.
    let shared_prompt = AttentionLayout::packed(&[(512, vec![256; 8])], None);
    let lists = TileLists::new(&shared_prompt, 32);
    let causal = TileLists::new(&AttentionLayout::causal(shared_prompt.len(), None), 32);
    assert!(
        lists.visited() * 2 < causal.visited(),
        "{} of {}",
        lists.visited(),
        causal.visited()
    );
}

/// Inputs of one attention problem in storage `E`, on the emulator.
struct Problem<E: Float> {
    shape: AttentionShape,
    layout: DeviceLayout,
    q: Vec<E>,
    k: Vec<E>,
    v: Vec<E>,
    dout: Vec<E>,
}

fn random<E: Float>(rng: &mut StdRng, n: usize) -> Vec<E> {
    (0..n)
        .map(|_| E::from_f32(rng.gen_range(-2.0..2.0)))
        .collect()
}

impl<E: Float> Problem<E> {
    fn new(rng: &mut StdRng, layout: &AttentionLayout, shape: AttentionShape) -> Self {
        let t = layout.len();
        let (q_len, kv_len) = (
            t * shape.heads * shape.head_dim,
            t * shape.kv_heads * shape.head_dim,
        );
        Problem {
            shape,
            layout: DeviceLayout::new(&Device::Emu, &Pool::default(), layout, tile_rows::<E>())
                .unwrap(),
            q: random(rng, q_len),
            k: random(rng, kv_len),
            v: random(rng, kv_len),
            dout: random(rng, q_len),
        }
    }

    fn upload(x: &[E]) -> Buffer<E> {
        Device::Emu.upload(x).unwrap()
    }

    fn forward(&self, q: &[E], k: &[E], v: &[E]) -> (Vec<E>, Vec<f32>) {
        let mut out = Device::Emu.alloc::<E>(q.len()).unwrap();
        let mut lse = Device::Emu
            .alloc::<f32>(self.layout.tokens() * self.shape.heads)
            .unwrap();
        AttentionKernels::new(&Device::Emu)
            .forward(
                &Self::upload(q),
                &Self::upload(k),
                &Self::upload(v),
                &self.layout,
                self.shape,
                &mut out,
                &mut lse,
            )
            .unwrap();
        (
            Device::Emu.download(&out).unwrap(),
            Device::Emu.download(&lse).unwrap(),
        )
    }

    /// (dq, dk, dv) from the forward's out and lse, with `seed` for every launch.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        q: &[E],
        k: &[E],
        v: &[E],
        dout: &[E],
        out: &[E],
        lse: &[f32],
        seed: u64,
    ) -> [Vec<E>; 3] {
        let mut grads = [
            Device::Emu.alloc::<E>(q.len()).unwrap(),
            Device::Emu.alloc::<E>(k.len()).unwrap(),
            Device::Emu.alloc::<E>(v.len()).unwrap(),
        ];
        let [dq, dk, dv] = &mut grads;
        AttentionKernels::new(&Device::Emu)
            .with_emu_seed(seed)
            .backward(
                &Self::upload(q),
                &Self::upload(k),
                &Self::upload(v),
                &Self::upload(out),
                &Device::Emu.upload(lse).unwrap(),
                &Self::upload(dout),
                &self.layout,
                self.shape,
                dq,
                dk,
                dv,
            )
            .unwrap();
        grads.each_ref().map(|g| Device::Emu.download(g).unwrap())
    }
}

/// `x` with the rows of one tile (all heads) set to NaN.
fn poisoned<E: Float>(x: &[E], tile: usize, rows: usize, row_len: usize) -> Vec<E> {
    let mut x = x.to_vec();
    let end = ((tile + 1) * rows * row_len).min(x.len());
    x[tile * rows * row_len..end].fill(E::from_f32(f32::NAN));
    x
}

/// Whether row `t` (of `row_len` elements) of `x` has a NaN, and whether it equals `clean`.
fn row_state<E: Float>(x: &[E], clean: &[E], t: usize, row_len: usize) -> (bool, bool) {
    let (got, want) = (
        &x[t * row_len..(t + 1) * row_len],
        &clean[t * row_len..(t + 1) * row_len],
    );
    let nan = got.iter().any(|v| v.to_f32().is_nan());
    (nan, same_bits(got, want))
}

fn same_bits<E: Float>(a: &[E], b: &[E]) -> bool {
    bytemuck::cast_slice::<E, u8>(a) == bytemuck::cast_slice::<E, u8>(b)
}

/// The poison test for one storage type. K and V of key tile j set to NaN reach exactly the
/// query tiles whose rows see a key of tile j: the others read nothing of tile j, so their
/// output (and dq) is the clean run's, bit for bit, while a tile that read the poison and
/// masked it would still carry it (0 · NaN = NaN in P · V). Likewise Q and dO of query tile i
/// set to NaN reach exactly the dk and dv of the key tiles that tile i sees.
fn masked_tiles_are_never_read<E: Float>(rng: &mut StdRng) {
    let layout = AttentionLayout::packed(&[(37, vec![29, 48]), (5, vec![9, 18, 2])], Some(20));
    let shape = AttentionShape {
        heads: 4,
        kv_heads: 2,
        head_dim: 24,
    };
    let p = Problem::<E>::new(rng, &layout, shape);
    let tile = tile_rows::<E>();
    let needed = needed_pairs(&layout, tile);
    let (q_row, kv_row) = (
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
    );
    let (out, lse) = p.forward(&p.q, &p.k, &p.v);
    let [clean_dq, clean_dk, clean_dv] = p.backward(&p.q, &p.k, &p.v, &p.dout, &out, &lse, 1);
    let mut skipped = 0;
    // readers[kt][qt]: query tile qt sees a key of tile kt.
    let readers: Vec<Vec<bool>> = (0..needed.len())
        .map(|kt| needed.iter().map(|row| row[kt]).collect())
        .collect();
    for (kt, read_by) in readers.iter().enumerate() {
        let (k, v) = (
            poisoned(&p.k, kt, tile, kv_row),
            poisoned(&p.v, kt, tile, kv_row),
        );
        let (got, _) = p.forward(&p.q, &k, &v);
        let [dq, dk, dv] = p.backward(&p.q, &k, &v, &p.dout, &out, &lse, 1);
        for t in 0..layout.len() {
            let must_read = read_by[t / tile];
            skipped += usize::from(!must_read);
            for (what, x, c) in [("out", &got, &out), ("dq", &dq, &clean_dq)] {
                let (nan, same) = row_state(x, c, t, q_row);
                assert_eq!(
                    nan, must_read,
                    "{what} of token {t}, key tile {kt} poisoned"
                );
                assert!(must_read || same, "{what} of token {t} changed");
            }
        }
        // The gradients of the other keys read nothing of tile kt.
        for s in (0..layout.len()).filter(|s| s / tile != kt) {
            for (what, x, c) in [("dk", &dk, &clean_dk), ("dv", &dv, &clean_dv)] {
                let (_, same) = row_state(x, c, s, kv_row);
                assert!(same, "{what} of key {s} changed, key tile {kt} poisoned");
            }
        }
    }
    assert!(skipped > 0, "the layout masks no tile out");
    for (qt, sees) in needed.iter().enumerate() {
        let (q, dout) = (
            poisoned(&p.q, qt, tile, q_row),
            poisoned(&p.dout, qt, tile, q_row),
        );
        let [_, dk, dv] = p.backward(&q, &p.k, &p.v, &dout, &out, &lse, 1);
        for s in 0..layout.len() {
            let must_read = sees[s / tile];
            for (what, x, c) in [("dk", &dk, &clean_dk), ("dv", &dv, &clean_dv)] {
                let (nan, same) = row_state(x, c, s, kv_row);
                assert_eq!(
                    nan, must_read,
                    "{what} of key {s}, query tile {qt} poisoned"
                );
                assert!(must_read || same, "{what} of key {s} changed");
            }
        }
    }
}

#[test]
fn masked_out_tiles_are_never_read() {
    let mut rng = common::rng("masked_out_tiles_are_never_read");
    masked_tiles_are_never_read::<f32>(&mut rng);
    masked_tiles_are_never_read::<bf16>(&mut rng);
}

/// The bytes of K and V that the forward and the backward's launches load, counted by the
/// emulator's probe around the kernels (`emu::watching`), by kernel name.
fn kv_bytes_loaded<E: Float>(p: &Problem<E>) -> BTreeMap<String, u64> {
    let up = |x: &[E]| Device::Emu.upload(x).unwrap();
    let (q, k, v, dout) = (up(&p.q), up(&p.k), up(&p.v), up(&p.dout));
    let bytes = std::mem::size_of_val(p.k.as_slice());
    let watched = [(k.device_ptr(), bytes), (v.device_ptr(), bytes)];
    let probe = emu::Probe {
        count: true,
        racecheck: false,
    };
    let ((), records) = emu::probed(probe, || {
        emu::watching(&watched, || {
            let kernels = AttentionKernels::new(&Device::Emu);
            let mut out = Device::Emu.alloc::<E>(p.q.len()).unwrap();
            let mut lse = Device::Emu
                .alloc::<f32>(p.layout.tokens() * p.shape.heads)
                .unwrap();
            kernels
                .forward(&q, &k, &v, &p.layout, p.shape, &mut out, &mut lse)
                .unwrap();
            let mut grads =
                [p.q.len(), p.k.len(), p.v.len()].map(|n| Device::Emu.alloc::<E>(n).unwrap());
            let [dq, dk, dv] = &mut grads;
            kernels
                .backward(
                    &q, &k, &v, &out, &lse, &dout, &p.layout, p.shape, dq, dk, dv,
                )
                .unwrap();
        })
    });
    let mut by_kernel = BTreeMap::new();
    for r in records {
        *by_kernel.entry(r.kernel).or_default() += r.traffic.watched_read_bytes;
    }
    by_kernel
}

/// Counted outside the kernels: the forward and the backward's dq launch load K and V of
/// exactly the (query tile, key tile) pairs in which a query sees a key (per query head),
/// the dk/dv launch each key tile once (per KV head); so the shared-prompt layout loads less
/// than the causal one of the same length, by the tiles its responses hide from each other.
fn masked_tiles_are_never_loaded<E: Float>(rng: &mut StdRng) {
    let shape = AttentionShape {
        heads: 4,
        kv_heads: 2,
        head_dim: 24,
    };
    let tile = tile_rows::<E>();
    let shared_prompt = AttentionLayout::packed(&[(51, vec![26; 8])], None);
    let causal = AttentionLayout::causal(shared_prompt.len(), None);
    let windowed = AttentionLayout::packed(&[(37, vec![29, 48]), (5, vec![9, 18, 2])], Some(20));
    let mut loaded = Vec::new();
    for layout in [&shared_prompt, &causal, &windowed] {
        let t = layout.len();
        let row_bytes = (shape.head_dim * std::mem::size_of::<E>()) as u64;
        let tile_bytes = |kt: usize| 2 * ((t - kt * tile).min(tile) as u64) * row_bytes;
        let pairs: u64 = needed_pairs(layout, tile)
            .iter()
            .flat_map(|row| row.iter().enumerate().filter(|(_, &n)| n))
            .map(|(kt, _)| tile_bytes(kt))
            .sum();
        let p = Problem::<E>::new(rng, layout, shape);
        let got = kv_bytes_loaded(&p);
        let kernel = |name: &str| got[&format!("attention_{name}_{}", E::DTYPE)];
        let heads = shape.heads as u64;
        assert_eq!(
            kernel("forward"),
            heads * pairs,
            "{} forward, {t} tokens",
            E::DTYPE
        );
        assert_eq!(
            kernel("backward_dq"),
            heads * pairs,
            "{} backward dq",
            E::DTYPE
        );
        let once = 2 * t as u64 * row_bytes * shape.kv_heads as u64;
        assert_eq!(kernel("backward_dkdv"), once, "{} backward dk/dv", E::DTYPE);
        assert_eq!(kernel("backward_delta"), 0, "{} backward delta", E::DTYPE);
        loaded.push(kernel("forward"));
    }
    // At a tenth of the 512 + 8 × 256 shape: 0.60 of the causal layout's bytes.
    assert!(
        loaded[0] * 10 < loaded[1] * 7,
        "{}: the shared prompt's forward loads {} bytes of K/V, the causal one {}",
        E::DTYPE,
        loaded[0],
        loaded[1]
    );
}

#[test]
fn masked_out_tiles_are_never_loaded_counted_by_the_emulator() {
    let mut rng = common::rng("masked_out_tiles_are_never_loaded");
    masked_tiles_are_never_loaded::<f32>(&mut rng);
    masked_tiles_are_never_loaded::<bf16>(&mut rng);
}

fn backward_is_deterministic<E: Float>(rng: &mut StdRng) {
    let layout = AttentionLayout::packed(&[(30, vec![20, 41, 7]), (3, vec![50])], Some(25));
    let shape = AttentionShape {
        heads: 8,
        kv_heads: 2,
        head_dim: 64,
    };
    let p = Problem::<E>::new(rng, &layout, shape);
    let (out, lse) = p.forward(&p.q, &p.k, &p.v);
    let first = p.backward(&p.q, &p.k, &p.v, &p.dout, &out, &lse, 0);
    for seed in [1, 0x5eed, u64::MAX] {
        let again = p.backward(&p.q, &p.k, &p.v, &p.dout, &out, &lse, seed);
        assert!(
            first.iter().zip(&again).all(|(a, b)| same_bits(a, b)),
            "{} backward under seed {seed}",
            E::DTYPE
        );
    }
}

#[test]
fn the_backward_gives_the_same_bits_under_every_block_order_and_schedule() {
    let mut rng = common::rng("backward_is_deterministic");
    backward_is_deterministic::<f32>(&mut rng);
    backward_is_deterministic::<bf16>(&mut rng);
}

#[test]
fn bad_layouts_and_shapes_are_errors_that_say_what_is_wrong() {
    let mut layout = AttentionLayout::causal(10, None);
    layout.own_start[4] = 7;
    let err = DeviceLayout::new(&Device::Emu, &Pool::default(), &layout, 16)
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("token 4 has own_start 7"),
        "{err:#}"
    );
    let mut layout = AttentionLayout::causal(10, None);
    layout.context_end[2] = 11;
    let err = DeviceLayout::new(&Device::Emu, &Pool::default(), &layout, 16)
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("context range [0, 11)"),
        "{err:#}"
    );

    let layout = DeviceLayout::new(
        &Device::Emu,
        &Pool::default(),
        &AttentionLayout::causal(3, None),
        16,
    )
    .unwrap();
    let shape = AttentionShape {
        heads: 2,
        kv_heads: 1,
        head_dim: 260,
    };
    let x = Device::Emu.alloc::<f32>(3 * 2 * 260).unwrap();
    let kv = Device::Emu.alloc::<f32>(3 * 260).unwrap();
    let mut out = Device::Emu.alloc::<f32>(3 * 2 * 260).unwrap();
    let mut lse = Device::Emu.alloc::<f32>(6).unwrap();
    let err = AttentionKernels::new(&Device::Emu)
        .forward(&x, &kv, &kv, &layout, shape, &mut out, &mut lse)
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("head dimension 260; the kernels take 1 to 256"),
        "{err:#}"
    );
    // bf16 kernels need the layout's tiles for bf16.
    let (xb, kvb) = (
        Device::Emu.alloc::<bf16>(3 * 2 * 16).unwrap(),
        Device::Emu.alloc::<bf16>(3 * 16).unwrap(),
    );
    let mut outb = Device::Emu.alloc::<bf16>(3 * 2 * 16).unwrap();
    let shape = AttentionShape {
        head_dim: 16,
        ..shape
    };
    let err = AttentionKernels::new(&Device::Emu)
        .forward(&xb, &kvb, &kvb, &layout, shape, &mut outb, &mut lse)
        .unwrap_err();
    assert!(format!("{err:#}").contains("tiles have 16 rows"), "{err:#}");
}

#[test]
fn bench_attention_prints_timings_and_tile_counts_as_json() {
    let out = common::contralign_ok(&[
        "bench",
        "attention",
        "--device",
        "emu",
        "--dtype",
        "f32",
        "--tokens",
        "70",
        "--mask",
        "causal,packed",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "16",
        "--prompt",
        "4",
        "--responses",
        "2",
        "--response-len",
        "33",
        "--reps",
        "1",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    // 70 causal tokens see 70·71/2 keys; the packed group (4 + 2·33) as many as its mask, in
    // fewer of the 5² tiles of 16: the second response skips the first one's middle tile.
    let packed = AttentionLayout::packed(&[(4, vec![33, 33])], None);
    let packed_pairs: usize = (0..packed.len()).map(|t| packed.keys(t).count()).sum();
    for (case, (tokens, pairs, tiles)) in cases
        .iter()
        .zip([(70, 70 * 71 / 2, 25), (70, packed_pairs, 25)])
    {
        assert_eq!(case["tokens"], tokens, "{case}");
        assert_eq!(case["visible_pairs"], pairs, "{case}");
        assert_eq!(case["tiles"], tiles, "{case}");
        for key in [
            "forward_ms",
            "forward_tflops",
            "backward_ms",
            "backward_tflops",
        ] {
            assert!(case[key].as_f64().unwrap() > 0.0, "{key}: {case}");
        }
    }
    assert!(cases[1]["tiles_visited"].as_u64() < cases[0]["tiles_visited"].as_u64());
}

#[test]
fn head_dims_that_rows_cannot_load_in_16_bytes_take_the_element_loads() {
    let mut rng = common::rng("odd_head_dims");
    // 1, 17 and 129 (the wide kernels): element loads in both storages; 36: 16-byte loads in
    // f32, not in bf16.
    for (head_dim, heads, kv_heads) in [(1, 3, 1), (17, 4, 2), (36, 2, 2), (129, 2, 1)] {
        let case = selftest::AttentionCase {
            name: "odd head dim",
            layout: AttentionLayout::packed(&[(19, vec![7, 30]), (4, vec![12])], Some(15)),
            shape: AttentionShape {
                heads,
                kv_heads,
                head_dim,
            },
        };
        let mut rows = selftest::attention::<f32>(&Device::Emu, &mut rng, &case).unwrap();
        rows.extend(selftest::attention::<bf16>(&Device::Emu, &mut rng, &case).unwrap());
        assert!(rows.iter().all(|r| r.pass), "{}", selftest::table(&rows));
    }
}
