"""fxplan.runtime"""
