"""HTCondor, PBS Pro, Torque and Grid Engine adapters: their job scripts, their parsers, their command lines.

None of these schedulers runs on this machine (only Slurm does), so these
systems were NOT run against a real scheduler here. What is proven instead:

* the parsers read genuine published outputs (``tests/data/batch/*.txt``, each
  naming its source on its first line) into exact results;
* the state tables follow each scheduler's documented states;
* the adapters send exactly the command lines and files meant, checked with a
  recording :class:`Runner` that answers with those published outputs. That
  checks our side of the conversation, not the scheduler's.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from wqsupervisor.batch import condor, pbs, scheduler, sge, system_class
from wqsupervisor.batch.base import (
    BatchOptions,
    BatchSystem,
    Completed,
    JobState,
    LocalRunner,
    Runner,
    SshRunner,
    SubmitError,
    Unavailable,
)
from wqsupervisor.batch.condor import Condor
from wqsupervisor.batch.pbs import Pbs, Torque
from wqsupervisor.batch.sge import Sge
from wqsupervisor.batch.slurm import Slurm
from wqsupervisor.config import Settings
from wqsupervisor.errors import ConfigError, WQSupervisorError

DATA = Path(__file__).parent / "data" / "batch"
WORKDIR = "/home/ana/.wqsupervisor/9123"
LAUNCHER = f"{WORKDIR}/launcher.sh"
FULL = BatchOptions(
    partition="long",
    account="chem42",
    walltime="04:00:00",
    cores=4,
    memory_mb=8192,
    disk_mb=2048,
    directives=("#EXTRA first", "#EXTRA second"),
)
P, R, D, F, C = JobState.PENDING, JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.CANCELLED


def sample(name: str) -> str:
    """A published output from tests/data/batch, without its leading source comment."""
    lines = (DATA / name).read_text().splitlines(keepends=True)
    while lines and lines[0].startswith("# "):
        lines.pop(0)
    return "".join(lines)


class Recorder(Runner):
    """Records what an adapter sends; answers each program with its next queued reply (else success)."""

    def __init__(self, **replies: Sequence[Completed]) -> None:
        self.calls: list[list[str]] = []
        self.writes: list[tuple[str, str, int]] = []
        self.replies = {program: list(answers) for program, answers in replies.items()}

    async def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float = 60.0) -> Completed:
        if list(argv[:3]) == ["sh", "-c", scheduler.SUBMIT_SCRIPT]:
            return self._batched(argv[4:], input)
        assert input is None, "no adapter feeds a scheduler command on stdin"
        self.calls.append(list(argv))
        queue = self.replies.get(argv[0])
        return queue.pop(0) if queue else Completed(0, "", "")

    def _batched(self, args: Sequence[str], input: str | None) -> Completed:
        """A batched submission, answered as the head's shell runs it (the real script: test_submit_script_*)."""
        script, write, count, command = args[0], args[1], int(args[2]), list(args[3:])
        assert command[-1] == script, "a submission ends with the job script it submits"
        if write == "1":
            assert input is not None
            self.writes.append((script, input, 0o700))
        out = [scheduler.WRITTEN]
        for _ in range(count):
            self.calls.append(command)
            queue = self.replies.get(command[0])
            done = queue.pop(0) if queue else Completed(0, "", "")
            if done.returncode != 0:
                return Completed(done.returncode, "\n".join(out) + "\n", done.stdout + done.stderr)
            out += [done.stdout.rstrip("\n"), scheduler.SUBMITTED]
        return Completed(0, "\n".join(out) + "\n", "")

    async def write(self, path: str, content: str, mode: int = 0o600) -> None:
        self.writes.append((path, content, mode))


def prepared(cls: type[BatchSystem], runner: Runner, options: BatchOptions | None = None) -> BatchSystem:
    """A system as prepare() leaves it: the launcher written into its work directory."""
    system = cls(runner, options)
    system.workdir, system.launcher_path = WORKDIR, LAUNCHER
    return system


def ok(stdout: str) -> Completed:
    """A command that succeeded with this output."""
    return Completed(0, stdout, "")


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("name", "cls"), [("condor", Condor), ("pbs", Pbs), ("torque", Torque), ("sge", Sge)]
)
def test_registry_names_these_classes(name, cls):
    """The registry's names resolve to these adapters."""
    assert system_class(name) is cls
    assert cls.name == name


@pytest.mark.parametrize("cls", [Condor, Pbs, Torque, Sge])
def test_submitting_before_prepare_says_what_to_do(cls):
    """Without prepare() there is no launcher to run, and submit() says so."""
    with pytest.raises(WQSupervisorError, match=r"call prepare\(\) before submit\(\)"):
        asyncio.run(cls(Recorder()).submit(1))


# ---------------------------------------------------------------- HTCondor


def test_condor_description_maps_every_option():
    """Cores, memory, disk, account, walltime and directives land in the submit description, queue last."""
    options = BatchOptions(
        account="group_chem.ana",
        walltime="04:00:00",
        cores=4,
        memory_mb=8192,
        disk_mb=2048,
        directives=('requirements = (OpSysAndVer == "AlmaLinux9")',),
    )
    assert condor.submit_description(options, WORKDIR, LAUNCHER, 3) == (
        "# wqsupervisor worker jobs: each runs the node launcher once\n"
        "universe = vanilla\n"
        "executable = /bin/sh\n"
        "arguments = \"'/home/ana/.wqsupervisor/9123/launcher.sh'\"\n"
        "transfer_executable = false\n"
        "should_transfer_files = NO\n"
        "batch_name = wqs-worker\n"
        "output = /home/ana/.wqsupervisor/9123/condor-$(ClusterId).$(ProcId).out\n"
        "error = /home/ana/.wqsupervisor/9123/condor-$(ClusterId).$(ProcId).err\n"
        "log = /home/ana/.wqsupervisor/9123/condor.log\n"
        "request_cpus = 4\n"
        "request_memory = 8192\n"
        "request_disk = 2097152\n"
        "accounting_group = group_chem.ana\n"
        "periodic_remove = JobStatus == 2 && time() - EnteredCurrentStatus > 14400\n"
        'requirements = (OpSysAndVer == "AlmaLinux9")\n'
        "queue 3\n"
    )


def test_condor_description_with_defaults():
    """With default options the description asks for one core and nothing more."""
    text = condor.submit_description(BatchOptions(), WORKDIR, LAUNCHER, 1)
    assert text.splitlines()[-2:] == ["request_cpus = 1", "queue 1"]
    assert "request_memory" not in text and "periodic_remove" not in text


def test_condor_quotes_a_launcher_path_with_quotes():
    """A path with spaces or quotes stays one argument in condor_submit's new syntax."""
    text = condor.submit_description(BatchOptions(), "/w", "/home/o'hara/my dir/l.sh", 1)
    assert "arguments = \"'/home/o''hara/my dir/l.sh'\"\n" in text


def test_condor_refuses_a_partition():
    """HTCondor has no partitions: asking for one is a configuration error that says what to use."""
    with pytest.raises(ConfigError) as err:
        Condor(Recorder(), BatchOptions(partition="long"))
    assert "requirements" in (err.value.hint or "")


def test_condor_refuses_a_malformed_walltime():
    """A walltime that is not HH:MM:SS is refused when the system is built, not at the first submission."""
    with pytest.raises(ConfigError, match="not HH:MM:SS"):
        Condor(Recorder(), BatchOptions(walltime="4h"))
    assert condor.walltime_seconds("48:30:05") == 48 * 3600 + 30 * 60 + 5


def test_condor_submit_output_from_the_manual():
    """The manual's condor_submit output (and DAGMan's variant with the logging line) give the job ids."""
    assert condor.parse_submit(sample("condor_submit.txt")) == ["6.0"]
    assert condor.parse_submit(sample("condor_submit_logging.txt")) == ["2267.0"]


def test_condor_submit_numbers_the_procs_of_one_cluster():
    """N jobs of cluster C are C.0 .. C.N-1 (the manual's line, with another count)."""
    text = sample("condor_submit.txt").replace("1 job(s)", "3 job(s)")
    assert condor.parse_submit(text) == ["6.0", "6.1", "6.2"]


def test_condor_refusal_has_no_ids():
    """The manual's refused submission holds no cluster, and parsing it says so."""
    with pytest.raises(ValueError, match="printed no cluster"):
        condor.parse_submit(sample("condor_submit_refused.txt"))


def test_condor_autoformat_reads_published_af_j_output():
    """``condor_q -af:j`` output as published by CHTC users: the job id first, then the values."""
    assert condor.parse_autoformat(sample("condor_q_af_j.txt")) == {
        "89980.3": ["392192"],
        "89980.4": ["320512"],
        "89980.6": ["305152"],
    }


def test_condor_states_leave_out_values_that_are_no_job_status():
    """Values that are no JobStatus code (here RequestMemory) give no state rather than a wrong one."""
    assert condor.parse_states(sample("condor_q_af_j.txt")) == {}


@pytest.mark.parametrize(
    ("status", "exit_code", "state"),
    [
        # HTCondor manual, docs/codes-other-values/job-status-codes.rst
        ("1", "undefined", P),  # Idle
        ("2", "undefined", R),  # Running
        ("3", "undefined", C),  # Removing
        ("4", "0", D),  # Completed, exit 0
        ("4", "1", F),  # Completed, exit 1
        ("4", "undefined", F),  # Completed by a signal: no ExitCode
        ("5", "undefined", F),  # Held: needs a person
        ("6", "undefined", R),  # Transferring Output
        ("7", "undefined", P),  # Suspended
        ("8", "undefined", None),  # not a documented code
    ],
)
def test_condor_job_status_codes(status, exit_code, state):
    """Every documented JobStatus code maps as the module docstring says; unknown codes map to nothing."""
    assert condor.job_state(status, exit_code) is state


def test_condor_submit_writes_the_description_and_submits_it():
    """submit() writes the description 0600 and runs condor_submit on it; the ids come from its output."""
    runner = Recorder(condor_submit=[ok(sample("condor_submit.txt"))])
    system = prepared(Condor, runner)
    assert asyncio.run(system.submit(1)) == ["6.0"]
    path = f"{WORKDIR}/worker.sub"
    assert runner.writes == [(path, condor.submit_description(BatchOptions(), WORKDIR, LAUNCHER, 1), 0o600)]
    assert runner.calls == [["condor_submit", path]]


def test_condor_refused_submission_carries_the_schedulers_words():
    """A refused condor_submit raises SubmitError with HTCondor's own error text and a hint."""
    runner = Recorder(condor_submit=[Completed(1, "", sample("condor_submit_refused.txt"))])
    with pytest.raises(SubmitError) as err:
        asyncio.run(prepared(Condor, runner).submit(2))
    assert err.value.message == (
        "condor_submit refused the worker jobs: Submitting job(s). / "
        "ERROR: Failed to commit job submission into the queue. / "
        "ERROR: This pool does not accept standard universe jobs."
    )
    assert f"{WORKDIR}/worker.sub" in (err.value.hint or "")


def test_condor_states_ask_the_queue_then_the_history():
    """Jobs condor_q no longer lists are looked up in condor_history, bounded, with the ids before -af."""
    # Replies in -af:j form (id, JobStatus, ExitCode); they drive the adapter, the parser is tested above.
    runner = Recorder(
        condor_q=[ok("6.0 2 undefined\n6.1 5 undefined\n")],
        condor_history=[ok("6.2 4 0\n")],
    )
    system = prepared(Condor, runner)
    assert asyncio.run(system.states(["6.0", "6.1", "6.2", "6.3"])) == {"6.0": R, "6.1": F, "6.2": D}
    assert runner.calls == [
        ["condor_q", "6.0", "6.1", "6.2", "6.3", "-af:j", "JobStatus", "ExitCode"],
        [
            "condor_history",
            "-limit",
            "2",
            "-scanlimit",
            "10000",
            "6.2",
            "6.3",
            "-af:j",
            "JobStatus",
            "ExitCode",
        ],
    ]


def test_condor_states_skip_the_history_when_all_are_queued():
    """When condor_q lists every job, condor_history is not run."""
    runner = Recorder(condor_q=[ok("6.0 1 undefined\n")])
    assert asyncio.run(prepared(Condor, runner).states(["6.0"])) == {"6.0": P}
    assert [call[0] for call in runner.calls] == ["condor_q"]


def test_condor_unreadable_queue_is_unavailable():
    """A failing condor_q is Unavailable (no state, never 'finished'), and the history is not asked."""
    runner = Recorder(condor_q=[Completed(1, "", "-- Failed to fetch ads from: <192.0.2.1:9618>")])
    with pytest.raises(Unavailable, match="condor_q failed: -- Failed to fetch ads from"):
        asyncio.run(prepared(Condor, runner).states(["6.0"]))
    assert len(runner.calls) == 1


def test_condor_cancel_tolerates_jobs_already_gone():
    """condor_rm of jobs that left the queue fails quietly; cancel() does not raise."""
    runner = Recorder(condor_rm=[Completed(1, "", "Couldn't find/remove all jobs matching constraint")])
    asyncio.run(prepared(Condor, runner).cancel(["6.0", "6.1"]))
    assert runner.calls == [["condor_rm", "6.0", "6.1"]]


def test_condor_close_removes_the_held_jobs_it_saw():
    """Held jobs (FAILED, yet still queued) are removed on close, before the work directory goes."""
    runner = Recorder(condor_q=[ok("6.0 2 undefined\n6.1 5 undefined\n")])
    system = prepared(Condor, runner)
    asyncio.run(system.states(["6.0", "6.1"]))
    asyncio.run(system.close())
    assert runner.calls[1:] == [["condor_rm", "6.1"], ["rm", "-rf", WORKDIR]]


# ---------------------------------------------------------------- Slurm's job script


def test_slurm_script_maps_every_option():
    """Slurm: cores, memory, partition, account, time and directives in #SBATCH lines, then exec sh."""
    assert prepared(Slurm, Recorder(), FULL).job_script() == (
        "#!/bin/sh\n"
        "#SBATCH --job-name=wqs-worker\n"
        "#SBATCH --output=/home/ana/.wqsupervisor/9123/slurm-%j.out\n"
        "#SBATCH --ntasks=1\n"
        "#SBATCH --cpus-per-task=4\n"
        "#SBATCH --mem=8192M\n"
        "#SBATCH --partition=long\n"
        "#SBATCH --account=chem42\n"
        "#SBATCH --time=04:00:00\n"
        "#EXTRA first\n"
        "#EXTRA second\n"
        "\n"
        "exec sh /home/ana/.wqsupervisor/9123/launcher.sh\n"
    )


def test_slurm_script_quotes_a_work_directory_with_spaces_and_quotes():
    """A home with blanks or quotes: --output double-quoted as sbatch reads it, the launcher shell-quoted."""
    system = Slurm(Recorder())
    system.workdir = '/home/my "dir" #2/.wqsupervisor/9'
    system.launcher_path = f"{system.workdir}/launcher.sh"
    lines = system.job_script().splitlines()
    assert '#SBATCH --output="/home/my \\"dir\\" \\#2/.wqsupervisor/9/slurm-%j.out"' in lines
    assert lines[-1] == "exec sh '/home/my \"dir\" #2/.wqsupervisor/9/launcher.sh'"


@pytest.mark.parametrize("field", ["partition", "account", "walltime"])
@pytest.mark.parametrize("value", ["long\nhostname", "long\r", "-x", "a b", "a#b", "a;b"])
def test_names_that_go_into_job_scripts_refuse_line_breaks_and_options(field, value):
    """A partition, account or wall time that would become a script line or an option is refused."""
    with pytest.raises(ConfigError, match=field):
        BatchOptions(**{field: value})


def test_directives_and_environment_refuse_line_breaks():
    """A directive with a line break, or an environment name that env would read as an option, is refused."""
    with pytest.raises(ConfigError, match="control character"):
        BatchOptions(directives=("#SBATCH --qos=low\nhostname",))
    with pytest.raises(ConfigError, match="environment variable name"):
        BatchOptions(env={"--chdir": "/etc"})


# ---------------------------------------------------------------- PBS Pro and Torque


def test_pbspro_script_maps_every_option():
    """PBS Pro: select chunk with cores and memory, walltime, queue, account, directives, then exec sh."""
    assert pbs.job_script(FULL, WORKDIR, LAUNCHER) == (
        "#!/bin/sh\n"
        "#PBS -N wqs-worker\n"
        "#PBS -S /bin/sh\n"
        "#PBS -j oe\n"
        "#PBS -o /home/ana/.wqsupervisor/9123/\n"
        "#PBS -l select=1:ncpus=4:mem=8192mb\n"
        "#PBS -l walltime=04:00:00\n"
        "#PBS -q long\n"
        "#PBS -A chem42\n"
        "#EXTRA first\n"
        "#EXTRA second\n"
        "\n"
        "exec sh /home/ana/.wqsupervisor/9123/launcher.sh\n"
    )


def test_torque_script_maps_every_option():
    """Torque: nodes=1:ppn and mem instead of a select chunk; the rest as on PBS Pro."""
    assert pbs.torque_job_script(FULL, WORKDIR, LAUNCHER) == (
        "#!/bin/sh\n"
        "#PBS -N wqs-worker\n"
        "#PBS -S /bin/sh\n"
        "#PBS -j oe\n"
        "#PBS -o /home/ana/.wqsupervisor/9123/\n"
        "#PBS -l nodes=1:ppn=4\n"
        "#PBS -l mem=8192mb\n"
        "#PBS -l walltime=04:00:00\n"
        "#PBS -q long\n"
        "#PBS -A chem42\n"
        "#EXTRA first\n"
        "#EXTRA second\n"
        "\n"
        "exec sh /home/ana/.wqsupervisor/9123/launcher.sh\n"
    )


def test_pbs_script_with_defaults_asks_for_one_core_only():
    """With default options only the core count is requested."""
    lines = pbs.job_script(BatchOptions(), WORKDIR, "/home/my dir/l.sh").splitlines()
    assert [line for line in lines if line.startswith("#PBS -l")] == ["#PBS -l select=1:ncpus=1"]
    assert lines[-1] == "exec sh '/home/my dir/l.sh'"


@pytest.mark.parametrize(
    ("text", "job"),
    [
        (sample("pbspro_qsub.txt"), "1.pbs"),  # PBS 23.06 qsub output
        (
            "673175[19].fruster.stanford.edu\n",
            "673175[19].fruster.stanford.edu",
        ),  # an id from the Torque sample
    ],
)
def test_pbs_qsub_output_gives_the_job_id(text, job):
    """qsub prints the job id alone; it is kept whole, server name included."""
    assert pbs.parse_submit(text) == job


def test_pbs_qsub_error_is_no_job_id():
    """A qsub error text is not taken for a job id."""
    with pytest.raises(ValueError, match="printed no job id"):
        pbs.parse_submit(sample("pbspro_qsub_refused.txt"))


def test_pbspro_states_of_a_running_job():
    """PBS 23.06 ``qstat -F json -f 1 -x`` of a running job."""
    assert pbs.parse_pbspro_states(sample("pbspro_qstat_running.txt")) == {"1.pbs": R}


def test_pbspro_states_of_finished_jobs():
    """PBS 23.06 ``qstat -F json -f -x``: two finished with Exit_status 0, one running."""
    assert pbs.parse_pbspro_states(sample("pbspro_qstat_finished.txt")) == {
        "1004.pbs": D,
        "1005.pbs": D,
        "1006.pbs": R,
    }


def test_pbspro_states_without_any_known_job():
    """Without known jobs PBS prints no "Jobs" key, and a non-JSON text (an error) gives nothing either."""
    header = sample("pbspro_qstat_running.txt").split('"Jobs"')[0].rstrip().rstrip(",") + "\n}"
    assert pbs.parse_pbspro_states(header) == {}
    assert pbs.parse_pbspro_states("qstat: Unknown Job Id 2001.g3\n") == {}


def test_torque_states_of_a_cluster_queue():
    """Torque ``qstat -x`` from a live cluster: running, queued, completed and array jobs."""
    assert pbs.parse_torque_states(sample("torque_qstat_x.txt")) == {
        "665199.superserver.stanford.edu": R,  # R, with the exit status of an earlier start
        "667999.superserver.stanford.edu": P,
        "673174.superserver.stanford.edu": D,
        # 673175[].superserver...: the array's summary record, left out
        "673175[19].fruster.stanford.edu": D,
        "673175[20].fruster.stanford.edu": D,
    }


def test_torque_states_of_a_non_xml_text():
    """An error text instead of XML gives no states."""
    assert pbs.parse_torque_states("qstat: Unknown Job Id Error 12345.mgt\n") == {}


@pytest.mark.parametrize(
    ("letter", "exit_status", "state"),
    [
        # qstat(1B) job states, PBS Professional and Torque
        ("Q", None, P),
        ("H", None, P),
        ("W", None, P),
        ("T", None, P),
        ("S", None, P),
        ("U", None, P),
        ("R", None, R),
        ("E", None, R),
        ("B", None, R),
        ("F", 0, D),
        ("F", 1, F),
        ("F", 271, F),  # killed by SIGTERM (256 + 15)
        ("F", -29, F),  # a PBS-internal failure
        ("F", None, C),  # deleted before it ran
        ("X", 0, D),
        ("C", 0, D),
        ("C", 2, F),
        ("M", None, None),  # moved to another server
        ("", None, None),
    ],
)
def test_pbs_job_states(letter, exit_status, state):
    """Every documented job_state letter maps as the module docstring says."""
    assert pbs.job_state(letter, exit_status) is state


def test_pbs_ids_match_with_or_without_the_full_server_name():
    """A job asked as 123.short is found when qstat names it 123.short.domain."""
    found = pbs.parse_torque_states(sample("torque_qstat_x.txt"))
    assert pbs.match_ids(["665199.superserver", "667999.superserver.stanford.edu", "1.other"], found) == {
        "665199.superserver": R,
        "667999.superserver.stanford.edu": P,
    }


def test_pbs_submit_writes_the_script_and_qsubs_it_once_per_job():
    """submit(2) writes the script 0700 once and runs qsub twice; the ids are qsub's."""
    runner = Recorder(qsub=[ok(sample("pbspro_qsub.txt")), ok("1004.pbs\n")])
    system = prepared(Pbs, runner, FULL)
    assert asyncio.run(system.submit(2)) == ["1.pbs", "1004.pbs"]
    script = f"{WORKDIR}/pbs-job.sh"
    assert runner.writes == [(script, pbs.job_script(FULL, WORKDIR, LAUNCHER), 0o700)]
    assert runner.calls == [["qsub", script], ["qsub", script]]


def test_torque_submit_writes_the_torque_script():
    """Torque writes its own script, under its own name."""
    runner = Recorder(qsub=[ok("667999.superserver.stanford.edu\n")])
    assert asyncio.run(prepared(Torque, runner, FULL).submit(1)) == ["667999.superserver.stanford.edu"]
    assert runner.writes == [
        (f"{WORKDIR}/torque-job.sh", pbs.torque_job_script(FULL, WORKDIR, LAUNCHER), 0o700)
    ]


def test_pbs_refused_submission_carries_the_schedulers_words():
    """A refused first qsub raises SubmitError with qsub's own words and a hint."""
    runner = Recorder(qsub=[Completed(1, "", sample("pbspro_qsub_refused.txt"))])
    with pytest.raises(SubmitError) as err:
        asyncio.run(prepared(Pbs, runner).submit(2))
    assert err.value.message == (
        "qsub refused the worker job: qsub: invalid option -- 'd' / "
        "qsub: directive error: -d /home/users/academy/nus/gmsv925/PROJECTS/NKTCL/work/80/"
    )
    assert "qstat -Q" in (err.value.hint or "")
    assert len(runner.calls) == 1


def test_pbs_keeps_the_jobs_accepted_before_a_refusal():
    """When a later qsub is refused, the jobs already accepted are returned, not lost."""
    runner = Recorder(
        qsub=[ok(sample("pbspro_qsub.txt")), Completed(1, "", sample("pbspro_qsub_refused.txt"))]
    )
    assert asyncio.run(prepared(Pbs, runner).submit(3)) == ["1.pbs"]
    assert len(runner.calls) == 2


def test_pbspro_states_command_and_unknown_ids():
    """qstat -f -F json -x with our ids; its complaint about one unknown id does not hide the others."""
    unknown = Completed(153, sample("pbspro_qstat_finished.txt"), "qstat: Unknown Job Id 7.pbs\n")
    runner = Recorder(qstat=[unknown])
    states = asyncio.run(prepared(Pbs, runner).states(["1004.pbs", "1006.pbs", "7.pbs"]))
    assert states == {"1004.pbs": D, "1006.pbs": R}
    assert runner.calls == [["qstat", "-f", "-F", "json", "-x", "1004.pbs", "1006.pbs", "7.pbs"]]


def test_torque_states_command():
    """Torque is asked with qstat -x (XML) and answered from the XML."""
    runner = Recorder(qstat=[ok(sample("torque_qstat_x.txt"))])
    states = asyncio.run(prepared(Torque, runner).states(["667999.superserver.stanford.edu"]))
    assert states == {"667999.superserver.stanford.edu": P}
    assert runner.calls == [["qstat", "-x", "667999.superserver.stanford.edu"]]


def test_pbs_cancel_tolerates_jobs_already_gone():
    """qdel of a finished or unknown job fails quietly; cancel() does not raise."""
    runner = Recorder(qdel=[Completed(153, "", "qdel: Unknown Job Id 7.pbs\n")])
    asyncio.run(prepared(Pbs, runner).cancel(["7.pbs"]))
    assert runner.calls == [["qdel", "7.pbs"]]


# ---------------------------------------------------------------- Grid Engine


def test_sge_script_maps_every_option():
    """SGE: smp PE for 4 cores, h_vmem per slot, h_rt, queue, project, directives, then exec sh."""
    assert sge.job_script(FULL, WORKDIR, LAUNCHER) == (
        "#!/bin/sh\n"
        "#$ -N wqs-worker\n"
        "#$ -S /bin/sh\n"
        "#$ -j y\n"
        "#$ -o /home/ana/.wqsupervisor/9123/\n"
        "#$ -pe smp 4\n"
        "#$ -l h_vmem=2048M\n"
        "#$ -l h_rt=04:00:00\n"
        "#$ -q long\n"
        "#$ -P chem42\n"
        "#EXTRA first\n"
        "#EXTRA second\n"
        "\n"
        "exec sh /home/ana/.wqsupervisor/9123/launcher.sh\n"
    )


def test_sge_script_uses_the_sites_parallel_environment():
    """A directive naming a parallel environment replaces the default smp one."""
    options = BatchOptions(cores=8, directives=("#$ -pe threads 8",))
    text = sge.job_script(options, WORKDIR, LAUNCHER)
    assert "-pe smp" not in text and "#$ -pe threads 8\n" in text


def test_sge_script_with_one_core_needs_no_parallel_environment():
    """One core asks for no parallel environment, and memory is then per job."""
    text = sge.job_script(BatchOptions(memory_mb=3000), WORKDIR, LAUNCHER)
    assert "-pe" not in text and "#$ -l h_vmem=3000M\n" in text


@pytest.mark.parametrize(
    ("text", "job"),
    [
        ("1176936\n", "1176936"),  # qsub -terse
        ("12345.1-10:1\n", "12345"),  # qsub -terse, an array
        (
            'Your job 1176936 ("wqs-worker") has been submitted\n',
            "1176936",
        ),  # msg_qmaster.h MSG_JOB_SUBMITJOB_US
    ],
)
def test_sge_qsub_output_gives_the_job_id(text, job):
    """The job number, from terse or from Grid Engine's longer submission message."""
    assert sge.parse_submit(text) == job


def test_sge_qsub_error_is_no_job_id():
    """Grid Engine's refusal text is not taken for a job id."""
    with pytest.raises(ValueError, match="printed no job id"):
        sge.parse_submit(sample("sge_qsub_refused.txt"))


def test_sge_states_with_extended_output():
    """``qstat -ext -urg -xml`` from a live cluster: one running, one waiting, one held."""
    assert sge.parse_states(sample("sge_qstat_xml_ext.txt")) == {"1212299": R, "1212263": P, "1212322": P}


def test_sge_states_of_a_busy_queue():
    """``qstat -xml`` from ISDC: 3 jobs being deleted (dt), 21 running (r), 27 waiting (qw)."""
    states = sge.parse_states(sample("sge_qstat_xml.txt"))
    pending = [str(n) for n in range(6176888, 6176916) if n != 6176894]
    assert states == {
        **dict.fromkeys(["5074985", "5074992", "5075009"], C),
        **dict.fromkeys([str(n) for n in range(6176867, 6176888)], R),
        **dict.fromkeys(pending, P),
    }
    assert Counter(states.values()) == {P: 27, R: 21, C: 3}


def test_sge_states_of_a_non_xml_text():
    """An error text instead of XML gives no states."""
    assert sge.parse_states("error: commlib error: got select error (Connection refused)\n") == {}
    assert sge.parse_states("") == {}


@pytest.mark.parametrize(
    ("code", "state"),
    [
        # qstat(1): d(eletion), E(rror), h(old), r(unning), R(estarted), s(uspended), S(uspended),
        # t(ransfering), T(hreshold), w(aiting), and q(ueued)
        ("qw", P),
        ("hqw", P),
        ("hRwq", P),
        ("Rq", P),
        ("w", P),
        ("r", R),
        ("t", R),
        ("Rr", R),
        ("Rt", R),
        ("s", P),
        ("S", P),
        ("T", P),
        ("dr", C),
        ("dt", C),
        ("dRr", C),
        ("Eqw", F),
        ("", None),
    ],
)
def test_sge_state_codes(code, state):
    """Every documented state code, and their usual combinations, map as the module docstring says."""
    assert sge.job_state(code) is state


def test_sge_submit_writes_the_script_and_qsubs_it_tersely():
    """submit(2) writes the script 0700 once and runs qsub -terse twice."""
    runner = Recorder(qsub=[ok("1212299\n"), ok("1212300\n")])
    assert asyncio.run(prepared(Sge, runner, FULL).submit(2)) == ["1212299", "1212300"]
    script = f"{WORKDIR}/sge-job.sh"
    assert runner.writes == [(script, sge.job_script(FULL, WORKDIR, LAUNCHER), 0o700)]
    assert runner.calls == [["qsub", "-terse", script]] * 2


def test_sge_refused_submission_carries_the_schedulers_words():
    """A refused qsub raises SubmitError with Grid Engine's own words and a hint."""
    runner = Recorder(qsub=[Completed(1, "", sample("sge_qsub_refused.txt"))])
    with pytest.raises(SubmitError) as err:
        asyncio.run(prepared(Sge, runner).submit(1))
    assert err.value.message == (
        'qsub refused the worker job: Unable to run job: denied: host "login1" is no submit host. / Exiting.'
    )
    assert "qconf -spl" in (err.value.hint or "")


def test_sge_states_command_keeps_only_our_jobs():
    """qstat -xml lists every job of the user; only the ids asked about are reported."""
    runner = Recorder(qstat=[ok(sample("sge_qstat_xml_ext.txt"))])
    states = asyncio.run(prepared(Sge, runner).states(["1212299", "1212322", "999"]))
    assert states == {"1212299": R, "1212322": P}
    assert runner.calls == [["qstat", "-xml"]]


def test_sge_close_deletes_jobs_seen_in_error():
    """A job in Eqw is FAILED; close() deletes it before removing the work directory."""
    # The extended sample with its held job put in error, as qstat shows one that cannot start.
    errored = sample("sge_qstat_xml_ext.txt").replace("<state>hqw</state>", "<state>Eqw</state>")
    runner = Recorder(qstat=[ok(errored)])
    system = prepared(Sge, runner)
    assert asyncio.run(system.states(["1212322"])) == {"1212322": F}
    asyncio.run(system.close())
    assert runner.calls[1:] == [["qdel", "1212322"], ["rm", "-rf", WORKDIR]]


def test_sge_cancel_tolerates_jobs_already_gone():
    """qdel of a job that is gone fails quietly; cancel() does not raise."""
    runner = Recorder(qdel=[Completed(1, "", 'denied: job "999" does not exist\n')])
    asyncio.run(prepared(Sge, runner).cancel(["999"]))
    assert runner.calls == [["qdel", "999"]]


# ---------------------------------------------------------------- the template: what is an answer


NO_JOB = ("Invalid job id specified",)


@pytest.mark.parametrize(
    ("done", "no_such_job", "reason"),
    [
        (Completed(0, "1 RUNNING\n", ""), (), None),
        (Completed(0, "", "a warning on stderr"), (), None),
        (Completed(1, "", "slurm_load_jobs error: Invalid job id specified"), NO_JOB, None),
        (Completed(1, "", "slurm_load_jobs error: invalid JOB ID specified"), NO_JOB, None),  # case ignored
        (
            Completed(1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"),
            NO_JOB,
            "squeue failed: slurm_load_jobs error: Unable to contact slurm controller (connect failure)",
        ),
        (Completed(2, "", ""), (), "squeue failed: exit status 2"),
        (
            Completed(255, "", "ssh: connect to host 10.0.0.1 port 22: Connection refused"),
            NO_JOB,
            "the head node could not be reached to run squeue: "
            "ssh: connect to host 10.0.0.1 port 22: Connection refused",
        ),
        (
            # ssh's failure wins even over words that would otherwise mean "no such job".
            Completed(255, "", "Invalid job id specified"),
            NO_JOB,
            "the head node could not be reached to run squeue: Invalid job id specified",
        ),
        (
            Completed(127, "", "bash: line 1: squeue: command not found"),
            NO_JOB,
            "squeue is not there (not installed, or not on PATH): bash: line 1: squeue: command not found",
        ),
        (
            Completed(124, "", "ssh timed out after 60 s", timed_out=True),
            NO_JOB,
            "squeue did not answer in time: ssh timed out after 60 s",
        ),
        (Completed(124, "", ""), (), "squeue failed: exit status 124"),  # 124 from the command itself
    ],
)
def test_what_counts_as_the_schedulers_answer(done, no_such_job, reason):
    """A command's status and words, read as an answer or as the reason there is none (pure)."""
    assert scheduler.unanswered(done, "squeue", scheduler.mentions(*no_such_job)) == reason


FAILED_QUERY = Completed(1, "", "qstat: cannot connect to server pbs (errno=15010)")


@pytest.mark.parametrize(
    ("cls", "program", "reply", "ids", "outcome"),
    [
        (Pbs, "qstat", Completed(153, "", "qstat: Unknown Job Id 7.pbs\n"), ["7.pbs"], {}),
        (Pbs, "qstat", Completed(35, "", "qstat: 7.pbs Job has finished, use -x or -H\n"), ["7.pbs"], {}),
        (Pbs, "qstat", FAILED_QUERY, ["7.pbs"], "qstat failed: qstat: cannot connect to server pbs"),
        (
            Torque,
            "qstat",
            Completed(153, "", "qstat: Unknown Job Id Error 12345.mgt\n"),
            ["12345.mgt"],
            {},
        ),
        (Torque, "qstat", FAILED_QUERY, ["12345.mgt"], "qstat failed: qstat: cannot connect"),
        # Grid Engine's qstat -xml takes no ids: any failure is the server's.
        (Sge, "qstat", Completed(1, "", 'denied: job "999" does not exist'), ["999"], "qstat failed: denied"),
        (Sge, "qstat", Completed(0, "", ""), ["999"], {}),
        (Condor, "condor_q", Completed(0, "", ""), ["6.0"], {}),
        (
            Condor,
            "condor_q",
            Completed(1, "", "Error: Couldn't contact the condor_collector"),
            ["6.0"],
            "condor_q failed",
        ),
    ],
)
def test_each_scheduler_says_no_such_job_in_its_own_words(cls, program, reply, ids, outcome):
    """Only a scheduler's documented 'no such job' answer is an answer when its state command fails."""
    if cls is Condor and reply.returncode == 0:
        runner = Recorder(condor_q=[reply], condor_history=[reply])
    else:
        runner = Recorder(**{program: [reply]})
    system = prepared(cls, runner)
    if isinstance(outcome, dict):
        assert asyncio.run(system.states(ids)) == outcome
    else:
        with pytest.raises(Unavailable) as err:
            asyncio.run(system.states(ids))
        assert err.value.message.startswith(outcome), err.value.message
        assert "none is submitted" in (err.value.hint or "")


@pytest.mark.parametrize(
    ("cls", "program", "reply", "gone"),
    [
        (Pbs, "qdel", Completed(153, "", "qdel: Unknown Job Id 7.pbs\n"), True),
        (Pbs, "qdel", Completed(35, "", "qdel: Job has finished 7.pbs\n"), True),
        (Pbs, "qdel", Completed(170, "", "qdel: Request invalid for state of job 7.pbs\n"), True),
        (Torque, "qdel", Completed(170, "", "qdel: Invalid state for job - COMPLETE 7.mgt\n"), True),
        (Sge, "qdel", Completed(1, "", 'denied: job "999" does not exist\n'), True),
        (Condor, "condor_rm", Completed(1, "", "Couldn't find/remove all jobs in cluster 6.\n"), True),
        (Condor, "condor_rm", Completed(1, "", "Job 6.0 not found\n"), True),
        (Pbs, "qdel", FAILED_QUERY, False),
        (
            Sge,
            "qdel",
            Completed(1, "", "error: commlib error: got select error (Connection refused)\n"),
            False,
        ),
        (Condor, "condor_rm", Completed(1, "", "Can't find address for schedd head\n"), False),
        (
            Condor,
            "condor_rm",
            Completed(255, "", "ssh: connect to host head port 22: No route to host"),
            False,
        ),
    ],
)
def test_cancelling_a_job_already_gone_is_no_failure_but_an_unreachable_scheduler_is(
    cls, program, reply, gone
):
    """cancel() accepts each scheduler's words for a job already gone; any other failure is Unavailable."""
    system = prepared(cls, Recorder(**{program: [reply]}))
    if gone:
        asyncio.run(system.cancel(["7"]))
    else:
        with pytest.raises(Unavailable):
            asyncio.run(system.cancel(["7"]))


def test_condor_history_that_cannot_be_read_leaves_out_the_jobs_that_left_the_queue():
    """condor_q answered that 6.1 left the queue; a history not kept there only leaves out how it ended."""
    runner = Recorder(
        condor_q=[ok("6.0 2 undefined\n")],
        condor_history=[Completed(1, "", "Error: No history file is defined\n")],
    )
    assert asyncio.run(prepared(Condor, runner).states(["6.0", "6.1"])) == {"6.0": R}


def test_condor_history_on_an_unreachable_head_is_unavailable():
    """If the head node goes away between condor_q and condor_history, the states are not reported."""
    runner = Recorder(
        condor_q=[ok("6.0 2 undefined\n")],
        condor_history=[Completed(255, "", "ssh: connect to host head port 22: Connection refused")],
    )
    with pytest.raises(Unavailable, match="could not be reached to run condor_history"):
        asyncio.run(prepared(Condor, runner).states(["6.0", "6.1"]))


@pytest.mark.parametrize("cls", [Condor, Pbs, Sge])
def test_a_submission_that_never_reached_the_scheduler_is_unavailable_not_refused(cls):
    """ssh failing during a submission says the head node was not reached, not that the scheduler refused."""
    program = "condor_submit" if cls is Condor else "qsub"
    runner = Recorder(
        **{program: [Completed(255, "", "ssh: connect to host head port 22: Connection refused")]}
    )
    with pytest.raises(
        Unavailable, match=f"cannot submit: the head node could not be reached to run {program}"
    ):
        asyncio.run(prepared(cls, runner).submit(1))


def test_a_submission_cut_short_keeps_the_jobs_accepted():
    """When the head node goes away after some qsubs succeeded, their ids are returned, not lost."""
    lost = Completed(255, "", "Connection to head closed by remote host.")
    runner = Recorder(qsub=[ok("1212299\n"), lost])
    assert asyncio.run(prepared(Sge, runner).submit(3)) == ["1212299"]


def test_a_program_that_is_not_installed_here_fails_as_a_shell_says_it():
    """LocalRunner reports a missing program as exit 127, as the head node's shell does over ssh."""
    done = asyncio.run(LocalRunner().run(["wqs-no-such-program-here"]))
    assert done.returncode == 127
    assert "wqs-no-such-program-here: command not found" in done.stderr
    assert scheduler.unreachable(done, "qstat") is not None


def test_a_command_that_outlives_its_timeout_is_marked_timed_out():
    """A command killed after its timeout is Completed with timed_out, which the template reads as no answer."""
    done = asyncio.run(LocalRunner().run(["sleep", "30"], timeout=0.2))
    assert done.timed_out and done.returncode == 124
    assert scheduler.unreachable(done, "sleep") == "sleep did not answer in time: sleep timed out after 0.2 s"


def test_the_ssh_runner_builds_the_same_command_line_from_a_target_as_from_settings():
    """SshRunner(settings.ssh_target()) runs exactly the ssh command line that was built from Settings before."""
    settings = Settings(
        via="ana@head.example.org",
        ssh_port=2222,
        identity="/home/ana/.ssh/id_cluster",
        ssh_options=(("ProxyJump", "gw.example.org"), ("Ciphers", "aes256-ctr")),
        ssh_config="/home/ana/.ssh/config.cluster",
        connect_timeout=7.5,
        ssh_program="/opt/ssh/bin/ssh",
    )
    runner = SshRunner(settings.ssh_target(), {"SLURM_CONF": "/etc/slurm/x.conf"})
    command = "env SLURM_CONF=/etc/slurm/x.conf squeue -h -o '%i %T'"
    # The command line remote_argv(settings, command) built before SshTarget existed, option for option.
    assert runner.argv(["squeue", "-h", "-o", "%i %T"]) == [
        "/opt/ssh/bin/ssh",
        "-F",
        "/home/ana/.ssh/config.cluster",
        "-p",
        "2222",
        "-i",
        "/home/ana/.ssh/id_cluster",
        *(
            [
                "-o",
                "BatchMode=yes",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "StreamLocalBindUnlink=yes",
                "-o",
                "ControlMaster=no",
            ]
        ),
        *(
            [
                "-o",
                "ControlPath=none",
                "-o",
                "ForwardAgent=no",
                "-o",
                "ForwardX11=no",
                "-o",
                "ClearAllForwardings=no",
            ]
        ),
        *(["-o", "ProxyJump=gw.example.org", "-o", "Ciphers=aes256-ctr"]),
        *(["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=40", "-o", "ConnectTimeout=7"]),
        "-T",
        "ana@head.example.org",
        command,
    ]
