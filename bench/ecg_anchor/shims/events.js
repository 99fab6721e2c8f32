class EventEmitter { on(){return this} emit(){return false} once(){return this} removeListener(){return this} } module.exports = { EventEmitter };
