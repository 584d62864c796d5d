"""The scale model (benchmarks/simulate.py) on a tiny configuration: every receiver ends with a verified image."""

import json

import pytest

from benchmarks import simulate as cli
from benchmarks.simulation.model import Image, LossModel, Scenario, simulate

RECEIVERS = 20


@pytest.fixture(scope="module")
def image():
    return Image.random(frames=300)


def run(image, loss, **options):
    # One loop lasts 3 s: long enough next to the repair timers (0.2 s) for repair to be what gets frames back.
    return simulate(Scenario(RECEIVERS, loss), image, link_rate=image.loop_bits / 3.0, seed=7, **options)


def assert_all_verified(result):
    assert result.incomplete == 0
    assert result.image_checks_ok == RECEIVERS  # check_image(true SHA-1) returned ImageVerified for each
    assert result.states == {"complete": RECEIVERS}
    assert all(1.0 <= loops < 3.0 for loops in result.completion_loops)


def test_with_loss_every_receiver_completes_and_repair_is_used(image):
    result = run(image, LossModel(0.02))
    assert_all_verified(result)
    assert result.repair_frames > 0
    assert result.requests_sent > 0
    assert result.percentile(0.5) < 2.0  # repair beats waiting for the next loop


def test_bursty_loss_and_late_joiners_complete_too(image):
    result = simulate(Scenario(RECEIVERS, LossModel(0.02, burst=10), join_spread=1.0), image, link_rate=image.loop_bits / 3.0, seed=3)
    assert result.incomplete == 0 and result.image_checks_ok == RECEIVERS


def test_without_loss_nobody_asks_and_one_loop_is_enough(image):
    result = run(image, LossModel())
    assert_all_verified(result)
    assert result.repair_frames == 0 and result.requests_sent == 0
    assert result.percentile(1.0) < 1.01  # one loop plus the metadata datagram


def test_skipping_duplicates_changes_nothing_but_speed(image):
    fast = run(image, LossModel(0.05))
    slow = run(image, LossModel(0.05), feed_duplicates=True)
    assert fast.completion_loops == slow.completion_loops
    assert (fast.repair_frames, fast.requests_sent, fast.carousel_frames) == (slow.repair_frames, slow.requests_sent, slow.carousel_frames)


def test_overrides_reach_the_protocol_and_are_restored(image):
    from vmcast.protocol import carousel

    off = run(image, LossModel(0.02), overrides={"MAX_REPAIRS_IN_A_ROW": 0})
    assert off.repair_frames == 0 and off.incomplete == 0  # the carousel alone still delivers
    assert carousel.MAX_REPAIRS_IN_A_ROW == 1


def test_the_command_line_has_help(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--help"])
    assert exit.value.code == 0 and "--receivers" in capsys.readouterr().out


def test_the_command_line_runs_and_writes_json_lines(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert cli.main(["--receivers", "5", "--loss", "2%", "--frames", "200", "--no-fec", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "200 frames x 1,400 bytes" in printed and "cores used: 1" in printed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records and all(r["incomplete"] == 0 and r["verified_images"] == r["receivers"] for r in records)


def test_checksums_that_come_after_their_blocks_are_checked_then():
    # Blocks of one frame need 8 metadata frames; a receiver that loses an early one but gets a later one
    # holds blocks before their checksums, which come a metadata round later: the block is checked then.
    from vmcast.protocol import manifest_of

    plain = Image.random(frames=400)
    data = b"".join(d[16:] for d in plain.datagrams)
    manifest = manifest_of(data, name="simulated.raw", block_size=1400)
    image = Image(manifest=manifest, datagrams=plain.datagrams, frame_bits=plain.frame_bits,
                  block_bytes=tuple(data[k * 1400 : (k + 1) * 1400] for k in range(400)))
    assert len(manifest.metadata_frames()) >= 8
    result = simulate(Scenario(30, LossModel(0.2)), image, link_rate=image.loop_bits / 3.0, seed=5,
                      overrides={"METADATA_INTERVAL": 0.5}, max_loops=10)
    assert result.incomplete == 0 and result.image_checks_ok == 30


def test_with_parity_every_receiver_completes_from_real_decodes_and_sends_less_than_per_frame_repair(image):
    nack = run(image, LossModel(0.02))
    fec = simulate(Scenario(RECEIVERS, LossModel(0.02), fec=True), image, link_rate=image.loop_bits / 3.0, seed=7)
    assert_all_verified(fec)
    assert fec.parity_frames > 0 and fec.parity_frames == fec.repair_frames  # parity only: no frame requests
    assert fec.decodes > 0  # blocks recovered by RaptorQ decoding, their frames compared with the image
    assert fec.repair_frames < nack.repair_frames
    assert fec.percentile(0.99) <= nack.percentile(0.99)


def test_parity_with_bursts_and_late_joiners_completes_too(image):
    result = simulate(Scenario(RECEIVERS, LossModel(0.02, burst=10), join_spread=1.0, fec=True), image,
                      link_rate=image.loop_bits / 3.0, seed=3)
    assert result.incomplete == 0 and result.image_checks_ok == RECEIVERS


def test_counting_decodable_blocks_as_recovered_agrees_with_real_decoding(image):
    # The two differ only where a decode from exactly K symbols needs one more (~1%): none in this run.
    scenario = Scenario(RECEIVERS, LossModel(0.05), fec=True)
    real = simulate(scenario, image, link_rate=image.loop_bits / 3.0, seed=11)
    counted = simulate(scenario, image, link_rate=image.loop_bits / 3.0, seed=11, decode="count")
    assert real.failed_decodes == 0 and real.decodes == counted.decodes > 0
    assert real.completion_loops == counted.completion_loops
    assert (real.parity_frames, real.requests_sent) == (counted.parity_frames, counted.requests_sent)


def test_the_command_line_runs_both_repair_modes(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert cli.main(["--receivers", "5", "--loss", "2%", "--frames", "200", "--no-fec", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "N=5, 2% indep, nack" in printed and "N=5, 2% indep, fec" in printed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["fec"] for r in records) == [False, True]
