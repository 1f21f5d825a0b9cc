"""`python -m megatron_eval_hook.launch`, with the CPU shims applied before Megatron is imported
(the launcher imports megatron.training before it runs the script)."""

from megatron_eval_hook import cpu_shims

cpu_shims.apply()

from megatron_eval_hook.launch import main  # noqa: E402

if __name__ == "__main__":
    main()
