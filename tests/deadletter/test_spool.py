"""The spool on the real PostgreSQL: a private folder, signed files, the quarantine.

The database outages here are real: the connection's port is pointed at nothing, so PostgreSQL
refuses to connect, as it does when it is down.
"""

import json
import logging
import os
import stat
import tempfile
from pathlib import Path

import pytest
from django.core import mail
from django.db import OperationalError

from safetynet import deadletter
from safetynet.checks import check_spool
from safetynet.deadletter import _spool, _spool_folder
from safetynet.exceptions import ConfigurationError
from safetynet.models import DeadLetter
from tests.fixtures.spool import as_root, failure, mode, quarantine_names, raw_fields, spool_file

pytestmark = pytest.mark.usefixtures("fresh_alert_window")


# -- where the spool is ------------------------------------------------------------------------------------

@pytest.fixture
def environment(monkeypatch, tmp_path):
    """A home of our own and a temporary directory of our own, without the XDG/systemd variables."""
    for name in ("STATE_DIRECTORY", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    monkeypatch.setenv("HOME", str(home))
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    return home


@pytest.fixture
def default_spool(settings):
    settings.SAFETYNET = {key: value for key, value in settings.SAFETYNET.items() if key != "SPOOL_DIR"}


def test_the_default_folder_is_private_created_0700_and_not_in_the_temporary_directory(environment, default_spool):
    previous = os.umask(0o000)  # the most permissive umask: the folders are 0700 all the same
    try:
        folder = _spool_folder.ensure()
    finally:
        os.umask(previous)
    assert folder == environment / ".local" / "state" / "safetynet" / "spool"
    assert not folder.is_relative_to(tempfile.gettempdir())
    for created in (environment / ".local", environment / ".local" / "state", folder.parent, folder):
        assert mode(created) == 0o700, created
    assert mode(environment) == 0o755  # an existing parent keeps its mode
    assert _spool.directory() == folder
    assert check_spool() == []


@pytest.mark.parametrize("variable, expected", [
    ("STATE_DIRECTORY", ("state", "safetynet-spool")),
    ("XDG_STATE_HOME", ("state", "safetynet", "spool")),
])
def test_a_service_state_folder_wins_over_the_home(environment, default_spool, monkeypatch, tmp_path, variable,
                                                    expected):
    monkeypatch.setenv(variable, str(tmp_path / "state"))
    assert _spool_folder.ensure() == tmp_path.joinpath(*expected)
    assert mode(tmp_path / "state") == 0o700


def test_without_a_usable_home_the_spool_is_a_private_folder_of_the_temporary_directory_and_w006_says_so(
        environment, default_spool, monkeypatch, tmp_path):
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    monkeypatch.setenv("HOME", str(not_a_folder / "home"))  # no home can be made there, even by root
    folder, origin = _spool_folder.location()
    assert origin == _spool_folder.TEMPORARY
    assert folder == Path(tempfile.gettempdir()) / f"safetynet-spool-{os.geteuid()}"
    [warning] = check_spool()
    assert warning.id == "safetynet.W006" and str(folder) in warning.msg and "SPOOL_DIR" in warning.hint
    assert _spool_folder.ensure() == folder and mode(folder) == 0o700


def test_spool_dir_must_be_an_absolute_path(settings):
    from safetynet import conf

    with pytest.raises(ConfigurationError, match="absolute path"):
        conf.build({"SPOOL_DIR": "var/spool"})
    with pytest.raises(ConfigurationError, match="path of a folder"):
        conf.build({"SPOOL_DIR": 3})
    assert conf.build({"SPOOL_DIR": "~/spool"}).spool_dir == os.path.expanduser("~/spool")


# -- a folder another user can write is refused ----------------------------------------------------------------

@pytest.mark.parametrize("unsafe_mode, who", [(0o777, "every user"), (0o1777, "every user"), (0o770, "its group")])
def test_a_spool_folder_others_can_write_is_refused_and_e006_says_so(private_spool, unsafe_mode, who):
    private_spool.mkdir()
    os.chmod(private_spool, unsafe_mode)
    with pytest.raises(ConfigurationError) as refused:
        _spool_folder.ensure()
    message = str(refused.value)
    assert str(private_spool) in message and f"can be written by {who}" in message
    assert f"mode {unsafe_mode:04o}" in message and f"chmod 700 {private_spool}" in message
    if unsafe_mode & stat.S_ISVTX:
        assert "sticky bit does not keep others from adding files" in message
    [error] = check_spool()
    assert error.id == "safetynet.E006" and error.msg == message
    assert mode(private_spool) == unsafe_mode  # refused, not silently changed


@pytest.mark.django_db
def test_nothing_planted_in_a_folder_others_can_write_is_read(private_spool):
    planted = spool_file(private_spool, raw_fields(task_id="planted"))  # even a valid signature
    os.chmod(private_spool, 0o777)
    with pytest.raises(ConfigurationError, match="can be written by every user"):
        deadletter.flush_spool()
    assert not DeadLetter.objects.filter(task_id="planted").exists() and planted.exists()


def test_a_spool_folder_that_cannot_be_created_is_e006(settings, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    settings.SAFETYNET = {**settings.SAFETYNET, "SPOOL_DIR": str(blocker / "spool")}
    [error] = check_spool()
    assert error.id == "safetynet.E006" and "cannot be created" in error.msg
    with pytest.raises(ConfigurationError, match="cannot be created"):
        _spool_folder.ensure()


@as_root
def test_a_spool_folder_of_another_user_is_refused(private_spool):
    private_spool.mkdir(mode=0o700)
    os.chown(private_spool, 65534, 65534)
    [error] = check_spool()
    assert error.id == "safetynet.E006" and "belongs to another user" in error.msg and "uid 65534" in error.msg


@pytest.mark.django_db(transaction=True)
def test_when_the_database_is_down_and_the_spool_refused_the_whole_record_is_logged(private_spool, database, caplog):
    private_spool.mkdir()
    os.chmod(private_spool, 0o777)
    database.down()
    with caplog.at_level(logging.ERROR, logger="safetynet"):
        ended = deadletter.give_up(failure(task_id="nowhere-to-go", args=[42]), log=False)
    database.up()
    assert ended.dead_letter.kept_in == "log" and ended.dead_letter.id is None
    [line] = [record for record in caplog.records if "could not be kept" in record.getMessage()]
    text = line.getMessage()
    assert "can be written by every user" in text and "Its whole record follows" in text
    logged = json.loads(text.split("so it is not lost: ", 1)[1])
    assert logged["task_id"] == "nowhere-to-go" and logged["args"] == [42]
    assert logged["exception_message"] == "gateway refused"
    assert list(private_spool.iterdir()) == []
    assert any("could be kept neither in the database nor in the spool" in message.body for message in mail.outbox)


# -- signed files --------------------------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_spooled_record_is_signed_and_moved_in_when_the_database_answers(private_spool, database):
    database.down()
    ended = deadletter.give_up(failure(task_id="spooled-while-down"), log=False)
    with pytest.raises(OperationalError):  # an outage stops the flush: the file waits
        deadletter.flush_spool()
    database.up()
    assert ended.dead_letter.kept_in == "spool"
    path = private_spool / "spooled-while-down.json"
    header, payload = path.read_bytes().split(b"\n", 1)
    assert header == _spool.FORMAT + b" " + _spool.sign(payload)
    assert mode(private_spool) == 0o700
    assert deadletter.flush_spool() == 1
    assert DeadLetter.objects.filter(task_id="spooled-while-down").exists() and not path.exists()


@pytest.mark.django_db
def test_untrusted_files_are_quarantined_never_stored_and_do_not_stop_the_flush(private_spool, tmp_path, caplog,
                                                                                quarantined_signals):
    legit = raw_fields(task_id="z-legit")
    spool_file(private_spool, legit)
    spool_file(private_spool, raw_fields(task_id="a-unsigned"))
    unsigned = private_spool / "a-unsigned.json"
    unsigned.write_bytes(unsigned.read_bytes().split(b"\n", 1)[1])  # the record alone, as before signatures
    spool_file(private_spool, raw_fields(task_id="b-other-key"), secret="the key of another project")
    altered = spool_file(private_spool, raw_fields(task_id="c-altered", args=["harmless"]))
    altered.write_bytes(altered.read_bytes().replace(b'"harmless"', b'"rm -rf /"'))
    truncated = spool_file(private_spool, raw_fields(task_id="d-truncated"))
    truncated.write_bytes(truncated.read_bytes()[:-20])
    (private_spool / "e-garbage.json").write_bytes(os.urandom(300))
    (private_spool / "f-empty.json").write_bytes(b"")
    (private_spool / "g-folder.json").mkdir()
    outside = spool_file(tmp_path / "elsewhere", raw_fields(task_id="h-linked"))
    (private_spool / "h-link.json").symlink_to(outside)  # a valid file, behind a link: not followed
    os.mkfifo(private_spool / "i-fifo.json")  # would block a reader that opened it naively
    (private_spool / "notes.txt").write_text("not a record: left alone")

    with caplog.at_level(logging.WARNING, logger="safetynet"):
        moved = deadletter.flush_spool()

    assert moved == 1 and DeadLetter.objects.filter(task_id="z-legit").exists()
    assert set(DeadLetter.objects.values_list("task_id", flat=True)) == {"z-legit"}
    assert quarantine_names(private_spool) == [
        "a-unsigned.json", "b-other-key.json", "c-altered.json", "d-truncated.json", "e-garbage.json",
        "f-empty.json", "g-folder.json", "h-link.json", "i-fifo.json"]
    assert sorted(path.name for path in private_spool.iterdir()) == ["notes.txt", "quarantine"]
    assert mode(private_spool / "quarantine") == 0o700
    assert os.path.islink(private_spool / "quarantine" / "h-link.json") and outside.exists()
    why = {Path(record.spool_file).name: record.why for record in caplog.records
           if getattr(record, "action", "") == "quarantine"}
    assert all(record.levelno == logging.WARNING for record in caplog.records if getattr(record, "why", None))
    assert "is not signed" in why["a-unsigned.json"] and "is not signed" in why["e-garbage.json"]
    for name in ("b-other-key.json", "c-altered.json", "d-truncated.json"):
        assert "signature that does not match" in why[name]
    assert "not a regular file" in why["g-folder.json"] and "not a regular file" in why["i-fifo.json"]
    assert "symbolic link" in why["h-link.json"]
    assert {item["kind"] for item in quarantined_signals} == {"untrusted"}
    assert all(item["record"] is None for item in quarantined_signals)  # a planted file's content is not passed on
    # One mail for the nine files: the alert is rate-limited per kind.
    [message] = mail.outbox
    assert message.subject.endswith("[safetynet] an untrusted spool file was quarantined")


@as_root
@pytest.mark.django_db
def test_a_spool_file_of_another_user_is_quarantined(private_spool, caplog):
    path = spool_file(private_spool, raw_fields(task_id="foreign"))
    os.chown(path, 65534, 65534)
    with caplog.at_level(logging.WARNING, logger="safetynet"):
        assert deadletter.flush_spool() == 0
    assert "belongs to uid 65534" in caplog.text and quarantine_names(private_spool) == ["foreign.json"]
    assert not DeadLetter.objects.filter(task_id="foreign").exists()


@pytest.mark.django_db
def test_a_file_signed_with_a_previous_secret_key_is_accepted_from_secret_key_fallbacks(private_spool, settings):
    spool_file(private_spool, raw_fields(task_id="before-rotation"))
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "the new key", [settings.SECRET_KEY]
    assert deadletter.flush_spool() == 1 and DeadLetter.objects.filter(task_id="before-rotation").exists()


def test_task_ids_that_differ_only_by_unsafe_characters_keep_a_file_each(private_spool):
    ids = ["order/7", "order_7", "order:7", "../order-7", "x" * 300, "x" * 300 + "y"]
    paths = {_spool.write(raw_fields(task_id=task_id), ConnectionError("down")) for task_id in ids}
    assert len(paths) == len(ids) and all(path.parent == private_spool for path in paths)
    assert {spooled.fields["task_id"] for spooled in _spool.pending()} == set(ids)


# -- the command ------------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_dead_flush_names_the_quarantine_and_refuses_an_unsafe_folder(private_spool):
    import io

    from django.core.management import CommandError, call_command

    spool_file(private_spool, raw_fields(task_id="planted"), secret="someone else's key")
    out = io.StringIO()
    call_command("safetynet", "dead", "flush", stdout=out)
    assert "Moved 0 spooled dead letters" in out.getvalue()
    assert f"1 file in {private_spool / 'quarantine'} will never be stored" in out.getvalue()
    os.chmod(private_spool, 0o757)
    with pytest.raises(CommandError, match="can be written by every user"):
        call_command("safetynet", "dead", "flush", stdout=io.StringIO())
