"""The chained CNI plugin (`plugin`, standard library only, copied onto the host), its installer
(`install`) and the agent's side of the plugin's socket (`server`): together they close the window in
which a new pod could send traffic before the agent captured it."""
