"""One checker per fact: a bad decoder entry, budget, class count or provenance gets the same
one-line error from the reader (a lie in the header) and from the writer (a bad `D3File`),
because `check_structure` checks it for both and `parse_header` only reads it."""
from __future__ import annotations

import dataclasses

import pytest

from d3codec.format import Budget, InvalidFieldError, OutOfRangeError, ReaderLimits, dumps, loads
from d3codec.format.header import DecoderDecl, SectionEntry, plan_of
from d3codec.format.testing import random_d3
from d3bytes import rebuild

#: name -> (edit of the header object, edit of the D3File, what the message says)
CASES = {
    "version negative": (lambda h: h["decoders"][0].update(version=-1), lambda d: setattr(d.decoders[0], "version", -1),
                         "decoders[0].version must be a non-negative integer"),
    "version text": (lambda h: h["decoders"][0].update(version="1"), lambda d: setattr(d.decoders[0], "version", "1"),
                     "decoders[0].version must be a non-negative integer"),
    "version bool": (lambda h: h["decoders"][0].update(version=True), lambda d: setattr(d.decoders[0], "version", True),
                     "decoders[0].version must be a non-negative integer"),
    "family empty": (lambda h: h["decoders"][0].update(family=""), lambda d: setattr(d.decoders[0], "family", ""),
                     "decoders[0].family must be a non-empty string"),
    "hparams list": (lambda h: h["decoders"][0].update(hparams=[1]), lambda d: setattr(d.decoders[0], "hparams", [1]),
                     "decoders[0].hparams must be a dict"),
    "classes not a list": (lambda h: h["decoders"][0].update(classes=0),
                           lambda d: setattr(d.decoders[0], "classes", 0), "decoders[0].classes must be a list"),
    "class not an int": (lambda h: h["decoders"][0]["classes"].append("x"),
                         lambda d: d.decoders[0].classes.append("x"), "decoders[0].classes holds 'x'"),
    "provenance list": (lambda h: h.update(provenance=[]), lambda d: setattr(d, "provenance", []),
                        "provenance must be a dict"),
    "budget unit": (lambda h: h.update(budget={"bytes": 10**6, "unit": "floppies"}),
                    lambda d: setattr(d, "budget", dataclasses.replace(d.budget, unit="floppies")),
                    "budget.unit 'floppies' is not one of"),
    "budget bytes zero": (lambda h: h.update(budget={"bytes": 0, "unit": "bytes"}),
                          lambda d: setattr(d, "budget", dataclasses.replace(d.budget, bytes=0)),
                          "budget.bytes must be a positive integer"),
    "num_classes bool": (lambda h: h["metadata"].update(num_classes=True),
                         lambda d: setattr(d.metadata, "num_classes", True), "metadata.num_classes must be a positive"),
}


def _file():
    d3 = random_d3(5, num_classes=3, decoders=2, labels="topk", kind="lowrank", dtype="I8", width=2)
    return d3.replace(budget=Budget(bytes=10**6, unit="bytes"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_reader_and_writer_report_a_bad_field_alike(name):
    header_edit, file_edit, says = CASES[name]
    d3 = _file()
    data = dumps(d3)
    with pytest.raises(InvalidFieldError) as read:
        loads(rebuild(data, header=header_edit))
    file_edit(d3)
    with pytest.raises(InvalidFieldError) as write:
        dumps(d3)
    assert says in str(read.value) and says in str(write.value)
    assert str(read.value).split(": ", 1)[1].split(";")[0] == str(write.value).split(": ", 1)[1].split(";")[0]


def test_a_class_count_over_the_limit_is_refused_before_any_check_sized_by_it():
    data = dumps(_file())
    with pytest.raises(OutOfRangeError, match="num_classes = 3 is over the limit 2"):
        loads(data, limits=ReaderLimits(max_classes=2))


def test_the_header_holds_typed_records():
    d3 = _file()
    plan = plan_of(d3)
    assert all(isinstance(d, DecoderDecl) for d in plan.decoders)
    assert [d.family for d in plan.decoders] == [d.family for d in d3.decoders]
    back = loads(dumps(d3))
    assert [d.classes for d in back.decoders] == [d.classes for d in d3.decoders]
    row = SectionEntry("priors", "none", 0, 16, 16)
    assert row.to_json() == {"name": "priors", "codec": "none", "offset": 0, "length": 16, "raw_length": 16}
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.offset = 8
