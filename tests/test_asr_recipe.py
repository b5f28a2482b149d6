"""recipes/asr/train.py end to end on the tiny espeak corpus, as a user runs it, and its config: every preset loads,
bad settings fail at start. The end-to-end run and the run a test kills are fresh processes; the others run the
script's main(argv) in this process (tests.helpers.run_recipe_in_process: the same output and exit status, without
a fresh process's imports)."""
import io
import json
import re

import numpy as np
import pytest
import soundfile
import torch
import yaml

from mm.checkpoint import list_checkpoints, load_checkpoint
from mm.config import ConfigError, parse_config
from mm.shards import read_samples
from tests.helpers import one_torch_thread  # noqa: F401 - a fixture
from tests.helpers import (ROOT, asr_recipe_command, kill_after_first_checkpoint, load_recipe, run_asr_recipe,
                           run_recipe_in_process, tiny_asr_corpus, write_tar)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PRESETS = ROOT / "recipes" / "asr" / "configs"
STEPS = 10  # tiny preset: checkpoints every 3 steps, the newest 2 kept; ~5 utterances a batch, 36 in an epoch


def tiny_args(data, out, *extra):
    # max_seconds=8: a shard of 36 utterances is too few to estimate bucket edges from, so they are even steps up
    # to max_seconds; with the default 30, every utterance (1-6 s) would land in the first of the 3 buckets
    return ["--config=tiny", f"--train_data={data}/train", f"--eval_data={data}/heldout", f"--out_dir={out}",
            f"--max_steps={STEPS}", "--max_seconds=8", *extra]


def run_here(args, check=True):
    return run_recipe_in_process("asr", args, check=check)


def step_file(out, step):
    return out / "checkpoints" / f"step_{step:08d}.pt"


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_asr_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny ASR run of STEPS steps: (out_dir, its CompletedProcess)."""
    out = tmp_path_factory.mktemp("asr_run") / "run"
    return out, run_asr_recipe(tiny_args(corpus, out))


# ---------------------------------------------------------------- end to end

def test_end_to_end_prints_scores_and_writes_results(trained):
    out, proc = trained
    lines = proc.stdout.splitlines()
    table = lines[lines.index(f"{'language':>8} {'n':>5} {'CER':>7} {'WER':>7} {'LID':>7}"):]
    assert [r.split()[:2] for r in table[1:5]] == [["el", "3"], ["en", "3"], ["ru", "3"], ["all", "9"]]
    assert table[5].startswith("mean over languages: CER")
    assert ("the table: decoded by beam search (6 beams, length bonus 1.5) joint with the CTC head "
            "(--eval_ctc_weight=0.5), the language of a clip unsure of it (P < 0.9) chosen with its transcript "
            "among the 3 likeliest; the decoder alone, greedy" in proc.stdout)
    assert f"checkpoint: {step_file(out, STEPS)}" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert {"cer", "wer", "lid_acc", "cer_mean", "wer_mean"} <= results.keys()
    for lang in ("en", "ru", "el"):
        assert {f"cer/{lang}", f"wer/{lang}", f"lid_acc/{lang}"} <= results.keys() and results[f"n/{lang}"] == 3
    assert results["rtf"] > 0 and results["eval_utterances"] == 9
    assert (results["step"], results["checkpoint"]) == (STEPS, str(step_file(out, STEPS)))
    assert (results["bad_samples"], results["too_long"], results["bad_shards"]) == (0, 0, 0)
    assert 0 <= results["lid_acc"] <= 1 and results["cer"] >= 0
    assert "examples" not in results

    metrics = rows(out)
    train_rows = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    assert all({"ce", "ctc", "lr", "batch_size", "bad_samples", "too_long"} <= r.keys() for r in train_rows)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns something in 10 steps
    eval_rows = [r for r in metrics if "cer_mean" in r]
    assert [r["step"] for r in eval_rows] == [STEPS]
    assert eval_rows[0]["cer_mean"] == pytest.approx(results["cer_mean"])
    assert eval_rows[0]["lid_acc"] == pytest.approx(results["lid_acc"])

    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [9, STEPS]
    assert yaml.safe_load((out / "config.yaml").read_text())["model"] == "cpu_tiny"
    from mm.asr.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(out / "tokenizer")
    assert {"en", "ru", "el"} <= set(tokenizer.languages)
    assert load_checkpoint(step_file(out, STEPS))["extra"]["dims"]["n_vocab"] == tokenizer.vocab_size
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):  # the export carries the same tokenizer
        assert (out / "export" / "hf" / name).read_bytes() == (out / "tokenizer" / name).read_bytes()


def test_exports_load_in_transformers_and_openai_whisper_with_our_logits(trained, corpus):
    import whisper
    from transformers import WhisperForConditionalGeneration

    from mm.asr.convert import load_whisper
    from mm.asr.features import N_SAMPLES, log_mel_spectrogram, pad_or_trim
    from mm.asr.tokenizer import load_tokenizer

    out, _ = trained
    ours, dims = load_whisper(out / "export" / "whisper.pt")
    final = load_checkpoint(step_file(out, STEPS))["model"]
    assert set(final) - set(ours.state_dict()) == {"ctc_head.weight", "ctc_head.bias"}  # neither format has it
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0, msg=k)

    sample = next(read_samples([str(corpus / "heldout" / "shard-000000.tar")], {"bad_shards": 0}))
    audio, _ = soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")
    mel = log_mel_spectrogram(pad_or_trim(torch.from_numpy(audio), N_SAMPLES), dims.n_mels)[None]  # [1, 80, 3000]
    tok = load_tokenizer(out / "tokenizer")
    tokens = torch.tensor([tok.sot_sequence("en") + tok.encode(" " + json.loads(sample["json"])["text"])])
    hf = WhisperForConditionalGeneration.from_pretrained(out / "export" / "hf").eval()
    openai = whisper.load_model(str(out / "export" / "whisper.pt"), device="cpu").eval()
    from_hf, _ = load_whisper(out / "export" / "hf")
    with torch.no_grad():
        want = ours(mel, tokens)
        got = {"transformers": hf(input_features=mel, decoder_input_ids=tokens).logits,
               "openai-whisper": openai(mel, tokens), "load_whisper(hf)": from_hf(mel, tokens)}
    assert want.shape == (1, tokens.shape[1], tok.vocab_size) and want.std() > 0.1
    for name, logits in got.items():
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-4, msg=name)
    assert hf.config.decoder_start_token_id == tok.sot and hf.config.eos_token_id == tok.eot


def test_results_are_those_of_the_checkpoint_and_decoder_alone_those_of_the_export(trained, corpus):
    """The run's final scores are joint CTC/attention beam search with its checkpoint's CTC head, and the decoder
    alone: the latter is what the exports (no CTC head in either format) score."""
    from mm.asr.convert import load_whisper
    from mm.asr.evaluate import evaluate_asr
    from mm.asr.model import ModelDimensions, Whisper
    from mm.asr.tokenizer import load_tokenizer

    out, _ = trained
    results = json.loads((out / "results.json").read_text())
    tokenizer = load_tokenizer(out / "tokenizer")
    state = load_checkpoint(step_file(out, STEPS))
    model = Whisper(ModelDimensions(**state["extra"]["dims"]), ctc=True, ctc_vocab=tokenizer.eot)
    model.load_state_dict(state["model"])
    joint = evaluate_asr(model, tokenizer, str(corpus / "heldout"), torch.device("cpu"), batch_size=16,
                         ctc_weight=0.5, beam_size=6, length_bonus=1.5, languages_tried=3)
    keys = [k for k in joint if k.startswith(("cer", "wer", "lid_acc", "n/"))]
    assert len(keys) == 5 + 4 * 3 + 4
    assert {k: joint[k] for k in keys} == pytest.approx({k: results[k] for k in keys})

    exported, _ = load_whisper(out / "export" / "whisper.pt")
    alone = evaluate_asr(exported, tokenizer, str(corpus / "heldout"), torch.device("cpu"), batch_size=16)
    assert "cer_decoder_alone" not in alone
    assert (alone["cer_mean"], alone["cer"], alone["wer"]) == pytest.approx(
        (results["cer_mean_decoder_alone"], results["cer_decoder_alone"], results["wer_decoder_alone"]))
    assert alone["lid_acc"] == pytest.approx(results["lid_acc_decoder_alone"])


# ---------------------------------------------------------------- kill and resume

@pytest.fixture(scope="module")
def two_shards(corpus, tmp_path_factory):
    """The corpus's training utterances in two shards (18 each), so that two loader workers have one each."""
    data = tmp_path_factory.mktemp("asr_two_shards")
    samples = [{k: v for k, v in s.items() if not k.startswith("__url")}
               for s in read_samples([str(corpus / "train" / "shard-000000.tar")], {"bad_shards": 0})]
    (data / "train").mkdir()
    for i in range(2):
        write_tar(data / "train" / f"shard-{i:06d}.tar", samples[i::2])
    (data / "heldout").symlink_to(corpus / "heldout")
    return data


@pytest.mark.parametrize("num_workers", [0, 2])
def test_killed_run_resumes_to_the_same_weights(request, num_workers, tmp_path):
    """SIGKILL a run after its first checkpoint, at which the duration buckets hold samples not yet trained on;
    --resume=latest replays them: the final weights, loader positions and every step's loss and batch size
    equal an uninterrupted run's. The killed run is a real process; the resume runs here, as does the
    uninterrupted run with workers (without, it is the end-to-end test's)."""
    if num_workers == 0:
        data, (full, _) = request.getfixturevalue("corpus"), request.getfixturevalue("trained")
    else:
        data, full = request.getfixturevalue("two_shards"), tmp_path / "full"
    args = [f"--num_workers={num_workers}", "--eval_data=none"]  # no eval: it comes after the last checkpoint
    if num_workers:
        run_here(tiny_args(data, full, *args))

    killed = tmp_path / "killed"
    done = kill_after_first_checkpoint(asr_recipe_command(tiny_args(data, killed, *args)), killed / "checkpoints")
    assert done and done[-1] < STEPS, f"the run was not killed mid-way (checkpoints {done})"
    at_kill = load_checkpoint(step_file(killed, done[-1]))["data"][0]
    held = [k for w in at_kill["workers"].values() for k in w["held"] + sum(w["pending"], [])]
    assert held, "no sample was held in a bucket at the checkpoint: the resume would replay none"

    if num_workers == 0:  # an out_dir with checkpoints is not trained over by accident
        refused = run_here(tiny_args(data, killed, *args), check=False)
        assert refused.returncode != 0 and "--resume=latest" in refused.stderr and "Traceback" not in refused.stderr
    resumed = run_here(tiny_args(data, killed, *args, "--resume=latest"))
    assert f"resumed from {step_file(killed, done[-1])} at step {done[-1]}" in resumed.stderr
    a, b = load_checkpoint(step_file(full, STEPS)), load_checkpoint(step_file(killed, STEPS))
    assert a["data"] == b["data"] and a["data"][0]["num_workers"] == max(1, num_workers)
    assert a["scheduler"] == b["scheduler"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)
    steps = {r["step"]: r for r in rows(killed) if "loss" in r}
    assert sorted(steps) == list(range(1, STEPS + 1)) and len(steps) == len([r for r in rows(killed) if "loss" in r])
    for r in (r for r in rows(full) if "loss" in r):  # the same batches, step by step
        assert (steps[r["step"]]["batch_size"], steps[r["step"]]["loss"]) == (r["batch_size"], pytest.approx(r["loss"]))


# ---------------------------------------------------------------- bad samples

def tone_flac(seconds: float) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * 16000)) / 16000
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="FLAC")
    return buf.getvalue()


def test_corrupt_and_too_long_samples_are_counted_and_skipped(corpus, tmp_path):
    """A shard opening with an undecodable flac and a 25 s utterance (under max_seconds=30, over the preset's
    max_batch_seconds=20, so no batch can hold it), then the corpus; read in order (no shuffle buffer)."""
    good = [{k: v for k, v in s.items() if not k.startswith("__url")}
            for s in read_samples([str(corpus / "train" / "shard-000000.tar")], {"bad_shards": 0})]
    bad = {"__key__": "garbage", "flac": b"fLaC\x00\x00\x00\x22 not really flac" * 20,
           "json": json.dumps({"text": "broken audio", "language": "en", "duration": 1.0})}
    long = {"__key__": "long", "flac": tone_flac(25.0),
            "json": json.dumps({"text": "a long tone", "language": "en", "duration": 25.0})}
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "shard-000000.tar", [bad, long, *good])
    out = tmp_path / "run"
    proc = run_here(["--config=tiny", f"--train_data={tmp_path / 'data'}", "--eval_data=none", f"--out_dir={out}",
                     "--max_steps=3", "--shuffle_buffer=0"])
    results = json.loads((out / "results.json").read_text())
    assert (results["step"], results["bad_samples"], results["too_long"]) == (3, 1, 1)
    assert "cer" not in results and "language" not in proc.stdout  # no eval data: no table
    assert [(r["step"], r["bad_samples"], r["too_long"]) for r in rows(out)] == [(1, 1, 1), (2, 1, 1), (3, 1, 1)]
    assert re.search(r"skipping sample garbage .*NotAudio", proc.stderr)
    assert step_file(out, 3).exists() and (out / "export" / "whisper.pt").exists()


# ---------------------------------------------------------------- config

def test_every_preset_parses_and_names_a_real_size():
    from mm.asr.model import SIZES, dims_for

    recipe = load_recipe("asr")
    presets = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert {"tiny", "whisper_base", "whisper_small"} <= set(presets)
    for name in presets:
        cfg = parse_config(recipe.ASRConfig, [f"--config={name}"], PRESETS)
        recipe.check_config(cfg)
        assert cfg.model in SIZES, name
        assert dims_for(cfg.model, n_mels=cfg.n_mels).n_mels == cfg.n_mels
        for key, value in yaml.safe_load((PRESETS / f"{name}.yaml").read_text()).items():
            assert getattr(cfg, key) == value, (name, key)  # every key applied, with its YAML type


@pytest.mark.parametrize("args, message", [
    (["--bogus=1"], "unknown config key 'bogus'"),
    (["--max_stpes=3"], "Did you mean: max_steps, max_seconds?"),
    (["--max_steps=many"], "--max_steps: expected an integer, got 'many'"),
    (["--spec_augment=maybe"], "--spec_augment: expected true/false, got 'maybe'"),
    (["--pad_to_30s=yes"], "--pad_to_30s=yes: accepted values are auto, true, false"),
    (["--model=nope"], "--model='nope' is not a named size; choose from ['base', 'cpu_small', 'cpu_tiny'"),
    (["--resampled=true"], "--resampled=true needs --epoch_samples > 0"),
    (["--train_weights=1,2"], "--train_weights needs --resampled=true"),
    (["--snr_db=30,10"], "--snr_db is [low, high] in dB, got [30.0, 10.0]"),
    (["--snr_db=10"], "--snr_db is [low, high] in dB, got [10.0]"),
    (["--snr_db=loud,quiet"], "--snr_db: expected a number, got 'loud'"),
    (["--speed_factors=0.9,0"], "--speed_factors must be positive"),
    (["--timestamp_prob=1.5"], "--timestamp_prob and --noise_prob in [0, 1]"),
    (["--ckpt_every=0"], "--ckpt_every must be >= 1, got 0"),
    (["--pad_to_30s=true"], "count 30 s each: --max_batch_seconds=20 fits none"),
    (["--init_from=/ckpt/whisper-small"], "(--pad_to_30s=auto, with --init_from) count 30 s each"),
])
def test_bad_config_is_refused_with_a_message(args, message):
    recipe = load_recipe("asr")
    with pytest.raises(ConfigError) as e:
        recipe.check_config(parse_config(recipe.ASRConfig, ["--config=tiny", *args], PRESETS))
    assert message in str(e.value)


def test_bad_preset_file_is_refused_with_a_message(tmp_path):
    recipe = load_recipe("asr")
    (tmp_path / "mine.yaml").write_text("model: cpu_tiny\nmax_steps: many\n")
    with pytest.raises(ConfigError, match="--max_steps: expected an integer, got 'many'"):
        parse_config(recipe.ASRConfig, [f"--config={tmp_path / 'mine.yaml'}"], PRESETS)
    with pytest.raises(ConfigError, match=r"no preset 'whisper_huge': .*'tiny', 'whisper_base', 'whisper_small'"):
        parse_config(recipe.ASRConfig, ["--config=whisper_huge"], PRESETS)


def test_recipe_fails_at_start_on_a_bad_config(tmp_path):
    proc = run_here(["--config=tiny", f"--out_dir={tmp_path / 'run'}", "--model=nope"], check=False)
    assert proc.returncode != 0
    assert "config error: --model='nope' is not a named size" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_corpus_none_of_whose_samples_decode_stops_at_once(corpus, tmp_path):
    """Every sample in a language Whisper has no token for: the run stops before training, with the reason,
    instead of counting the whole corpus as bad samples."""
    samples = [{k: v for k, v in s.items() if not k.startswith("__url")}
               for s in read_samples([str(corpus / "train" / "shard-000000.tar")], {"bad_shards": 0})]
    for s in samples:
        s["json"] = json.dumps({**json.loads(s["json"]), "language": "zz"})
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "shard-000000.tar", samples)
    proc = run_here(["--config=tiny", f"--train_data={tmp_path / 'data'}", "--eval_data=none",
                     f"--out_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "none of the first 20 samples" in proc.stderr and "language 'zz' has no token" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_pt_checkpoint_finds_its_tokenizer_beside_it_or_says_why_not(trained, tmp_path):
    import shutil

    from mm.asr.convert import load_checkpoint_tokenizer
    from mm.asr.tokenizer import load_tokenizer
    out, _ = trained
    lonely = tmp_path / "lonely" / "whisper.pt"
    lonely.parent.mkdir()
    shutil.copy(out / "export" / "whisper.pt", lonely)
    with pytest.raises(ValueError, match="is not one of OpenAI's vocabularies and no tokenizer files"):
        load_checkpoint_tokenizer(lonely)
    beside = tmp_path / "hf"
    shutil.copytree(out / "export" / "hf", beside)
    shutil.copy(out / "export" / "whisper.pt", beside / "whisper.pt")
    ours = load_tokenizer(out / "tokenizer")
    found = load_checkpoint_tokenizer(beside / "whisper.pt")
    assert (found.vocab_size, found.sot, found.encode(" hello")) == (ours.vocab_size, ours.sot, ours.encode(" hello"))
