"""Settings: flags over the TOML file over WQSUPERVISOR_* over defaults, and clear errors."""

from __future__ import annotations

import pytest

from wqsupervisor.cli import build_parser
from wqsupervisor.config import Settings, parse_ssh_option, resolve, settings_from_kwargs
from wqsupervisor.errors import ConfigError


def test_precedence_flags_then_file_then_environment(tmp_path):
    """Each source overrides the ones below it, setting by setting."""
    cfg = tmp_path / "wq.toml"
    cfg.write_text('via = "file-host"\nremote-port = 2000\nssh_port = 2222\n')
    env = {
        "WQSUPERVISOR_VIA": "env-host",
        "WQSUPERVISOR_REMOTE_PORT": "3000",
        "WQSUPERVISOR_IDENTITY": "/k",
        "WQSUPERVISOR_STALL_AFTER": "4.5",
    }
    s = resolve({"via": "flag-host"}, cfg, env)
    assert (s.via, s.remote_port, s.ssh_port, s.identity, s.stall_after) == (
        "flag-host",
        2000,
        2222,
        "/k",
        4.5,
    )
    s = resolve({}, None, env)
    assert (s.via, s.remote_port) == ("env-host", 3000)
    assert resolve({}, None, {}) == Settings()


def test_ssh_options_from_each_source(tmp_path):
    """--ssh-option pairs, a TOML list or table, and a ;-separated variable all give (key, value) pairs."""
    cfg = tmp_path / "wq.toml"
    cfg.write_text('ssh_options = ["ServerAliveCountMax=4", "Ciphers=aes128-ctr,aes256-ctr"]\n')
    assert resolve({}, cfg, {}).ssh_options == (
        ("ServerAliveCountMax", "4"),
        ("Ciphers", "aes128-ctr,aes256-ctr"),
    )
    cfg.write_text('[ssh_options]\nProxyJump = "gw"\n')
    assert resolve({}, cfg, {}).ssh_options == (("ProxyJump", "gw"),)
    env = {"WQSUPERVISOR_SSH_OPTIONS": "A=1;B=two words"}
    assert resolve({}, None, env).ssh_options == (("A", "1"), ("B", "two words"))
    flags = {"ssh_options": [parse_ssh_option("ConnectTimeout=3")]}
    assert resolve(flags, cfg, env).ssh_options == (("ConnectTimeout", "3"),)


def test_boolean_settings_read_like_people_write_them():
    """yes/no, true/false, 1/0 all work for a flag setting in the environment."""
    for text, value in (("yes", True), ("1", True), ("true", True), ("no", False), ("0", False)):
        assert resolve({}, None, {"WQSUPERVISOR_ALLOW_NO_PASSWORD": text}).allow_no_password is value


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"remote_port": 70000}, "not a TCP port"),
        ({"ssh_port": 0}, "not a TCP port"),
        ({"via": "-oProxyCommand=evil"}, "not a host name"),
        ({"via": "two words"}, "not a host name"),
        ({"backend": "telnet"}, "unknown backend"),
        ({"stall_after": 0}, "must be positive"),
        ({"master_timeout": -1}, "master_timeout must be 0"),
        ({"ssh_options": (("Bad Key", "x"),)}, "malformed"),
    ],
)
def test_bad_values_are_refused_with_a_reason(kwargs, message):
    """Malformed settings fail when built, with a message that names the problem."""
    with pytest.raises(ConfigError, match=message):
        Settings(**kwargs)


def test_wrong_types_name_their_source(tmp_path):
    """A value of the wrong type says where it came from."""
    cfg = tmp_path / "wq.toml"
    cfg.write_text("remote_port = 'many'\n")
    with pytest.raises(ConfigError, match=str(cfg)):
        resolve({}, cfg, {})
    with pytest.raises(ConfigError, match="WQSUPERVISOR_SSH_PORT"):
        resolve({}, None, {"WQSUPERVISOR_SSH_PORT": "22x"})


def test_unknown_settings_are_refused(tmp_path):
    """A typo in the file or in keyword arguments is an error, not silently ignored."""
    cfg = tmp_path / "wq.toml"
    cfg.write_text("remote_prot = 10001\n")
    with pytest.raises(ConfigError, match="unknown setting 'remote_prot'"):
        resolve({}, cfg, {})
    with pytest.raises(ConfigError, match="remote_prot"):
        settings_from_kwargs({"remote_prot": 1})
    with pytest.raises(ConfigError, match="does not exist"):
        resolve({}, tmp_path / "missing.toml", {})


def test_a_tunnel_needs_a_head_node_and_a_port():
    """require_tunnel says which of the two is missing and how to give it."""
    with pytest.raises(ConfigError, match="--via"):
        Settings(remote_port=1).require_tunnel()
    with pytest.raises(ConfigError, match="--remote-port"):
        Settings(via="h").require_tunnel()
    Settings(via="h", remote_port=0).require_tunnel()


def test_settings_survive_the_trip_to_the_engine():
    """to_dict output read back by settings_from_kwargs is the same settings."""
    s = Settings(via="a@b", remote_port=5, ssh_options=(("K", "v=w"),), allow_no_password=True)
    assert settings_from_kwargs(s.to_dict()) == s


def test_several_head_nodes_from_each_source(tmp_path):
    """A list of heads (TOML, repeated flag, keyword argument): the first in via, the others in also_via."""
    toml = tmp_path / "heads.toml"
    toml.write_text('via = ["login1", "login2", "login3"]\nnode-via = ["n1", "n2"]\nremote_port = 10001\n')
    from_file = resolve(config_file=toml, environ={})
    assert (from_file.via, from_file.also_via) == ("login1", ("login2", "login3"))
    assert (from_file.node_via, from_file.also_node_via) == ("n1", ("n2",))
    flags = build_parser().parse_args(["run", "--via", "a", "--via", "b", "--remote-port", "1", "app.py"])
    from_flags = resolve({"via": flags.via, "remote_port": flags.remote_port}, environ={})
    assert (from_flags.via, from_flags.also_via) == ("a", ("b",))
    kwargs = settings_from_kwargs({"via": ["x", "y"], "remote_port": 10001})
    assert [t.destination for t in kwargs.ssh_targets()] == ["x", "y"]
    assert settings_from_kwargs({"via": "x", "remote_port": 10001}).also_via == ()


def test_several_head_nodes_need_a_fixed_remote_port():
    """The head picking the port (0) cannot work when the workers may reach any of several heads."""
    with pytest.raises(ConfigError, match="cannot work with several head nodes"):
        settings_from_kwargs({"via": ["x", "y"], "remote_port": 0})
