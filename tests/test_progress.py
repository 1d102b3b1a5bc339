"""Progress off a terminal (amorlip.progress): plain lines, never tqdm's carriage-return frames."""
import io

from amorlip import progress


def test_plain_counter_prints_a_line_per_period_and_one_at_close():
    out = io.StringIO()
    bar = progress.PlainCounter(4, "flops", stream=out, every_s=0.0)  # every update is a period
    bar.set_postfix(case="clip")
    for _ in range(4):
        bar.update(1)
    bar.close()
    bar.close()  # a second close prints nothing more
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["flops: 1/4 (25%)", "flops: 2/4 (50%)", "flops: 3/4 (75%)",
                                                        "flops: 4/4 (100%)", "flops: 4/4 (100%)"]
    assert all(line.endswith("elapsed | case=clip") for line in lines)
    assert "\r" not in out.getvalue()


def test_plain_counter_waits_for_its_period():
    out = io.StringIO()
    bar = progress.PlainCounter(None, "encode", stream=out, every_s=3600.0)
    for _ in range(50):
        bar.update(1)
    assert out.getvalue() == ""
    bar.close()
    assert out.getvalue().startswith("encode: 50 | 0:00:00 elapsed")


def test_counter_off_a_terminal_and_disabled(capsys):
    assert isinstance(progress.counter(3, "x"), progress.PlainCounter)  # pytest's stderr is not a TTY
    silent = progress.counter(3, "x", disable=True)
    silent.update(1)
    silent.close()
    assert list(progress.iterate(range(3), "items", every_s=3600.0)) == [0, 1, 2]
    assert list(progress.iterate(iter([1, 2]), "gen", enabled=False)) == [1, 2]
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("items: 3/3 (100%)") and len(err.splitlines()) == 1


def test_iterate_takes_an_iterable_whose_len_raises(capsys):
    class NoLen:  # a DataLoader over an IterableDataset has __len__, which raises TypeError
        def __len__(self):
            raise TypeError("no len")

        def __iter__(self):
            return iter([1, 2])

    assert list(progress.iterate(NoLen(), "stream", every_s=3600.0)) == [1, 2]
    assert capsys.readouterr().err.startswith("stream: 2 | ")
